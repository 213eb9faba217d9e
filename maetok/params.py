"""The parameter tree: names, shapes and init rules, shared by every backend (docs/design.md §2).

The tree is the public interface of the model. Both backends read and write exactly these
keys, shapes and layouts (a dense weight is ``(in, out)``, applied as ``x @ w + b``;
transformer blocks are stacked along a leading depth axis; conv kernels are
``(kh, kw, in, out)``), so converting a checkpoint between backends is the identity.

Each parametrised unit has a ``spec_<unit>`` here giving ``ParamSpec`` leaves; the numpy
initialiser draws each leaf from its own generator seeded by ``(seed, crc32(path))``, so a
leaf's initial value does not depend on which other leaves exist.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from maetok.config import Config, ModelConfig
from maetok.targets import target_dim
from maetok.tree import Tree, leaves, map_tree, map_with_path


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    init: str  # "xavier", "he" (normal, σ = √(2/fan_in)), "normal" (σ = 0.02), "zeros", "ones"


def _dense(d_in: int, d_out: int, init: str = "xavier") -> Tree:
    return {"w": ParamSpec((d_in, d_out), init), "b": ParamSpec((d_out,), "zeros")}


def _norm(d: int) -> Tree:
    return {"scale": ParamSpec((d,), "ones"), "bias": ParamSpec((d,), "zeros")}


def _stack(depth: int, tree: Tree) -> Tree:
    return map_tree(lambda s: ParamSpec((depth, *s.shape), s.init), tree)


def spec_block(d: int, mlp_ratio: int) -> Tree:
    """One pre-norm transformer block: LN → fused QKV attention → LN → GELU MLP."""
    return {
        "ln1": _norm(d),
        "qkv": _dense(d, 3 * d),  # columns: [q | k | v], heads contiguous within each
        "proj": _dense(d, d),
        "ln2": _norm(d),
        "fc1": _dense(d, mlp_ratio * d),
        "fc2": _dense(mlp_ratio * d, d),
    }


def spec_encoder(m: ModelConfig) -> Tree:
    d = m.enc_width
    return {
        "patch_embed": _dense(m.patch_dim, d),
        "mask_token": ParamSpec((d,), "normal"),
        "latent_tokens": ParamSpec((m.num_latent_tokens, d), "normal"),
        "latent_pos": ParamSpec((m.num_latent_tokens, d), "normal"),
        "blocks": _stack(m.enc_depth, spec_block(d, m.mlp_ratio)),
        "norm": _norm(d),
        "bottleneck": _dense(d, m.latent_dim),
    }


def spec_latent_decoder(m: ModelConfig, width: int, depth: int, out_dim: int) -> Tree:
    """A ViT that reads the latent tokens h and predicts ``out_dim`` values per image token."""
    tree = {
        "query": ParamSpec((width,), "normal"),  # e: one vector for every image position
        "latent_proj": _dense(m.latent_dim, width),
        "latent_pos": ParamSpec((m.num_latent_tokens, width), "normal"),
        "blocks": _stack(depth, spec_block(width, m.mlp_ratio)),
        "norm": _norm(width),
        "head": _dense(width, out_dim),
    }
    if m.query_pos:  # e + query_pos[i] at image position i (row-major patch order)
        tree["query_pos"] = ParamSpec((m.num_patches, width), "normal")
    return tree


def spec_aux(m: ModelConfig) -> Tree:
    aux = {}
    for name in m.aux_targets:
        dim = target_dim(name, m)
        if m.aux_kind == "vit":
            aux[name] = spec_latent_decoder(m, m.aux_width, m.aux_depth, dim)
        else:  # the seed's 3-layer MLP on pixel-decoder features
            hid = m.aux_mlp_hidden
            aux[name] = {
                "fc1": _dense(m.dec_width, hid),
                "fc2": _dense(hid, hid),
                "fc3": _dense(hid, dim),
            }
    return aux


def spec_params(m: ModelConfig) -> Tree:
    """The tokenizer's trainable tree: encoder, pixel decoder, auxiliary decoders."""
    return {
        "encoder": spec_encoder(m),
        "decoder": spec_latent_decoder(m, m.dec_width, m.dec_depth, m.patch_dim),
        "aux": spec_aux(m),
    }


def disc_widths(m: ModelConfig) -> list[int]:
    """Channel widths of the patch-GAN: C, then disc_width doubling per stride-2 conv."""
    return [m.channels] + [m.disc_width * 2**i for i in range(m.disc_depth)]


def spec_disc(m: ModelConfig) -> Tree:
    """Patch-GAN: ``disc_depth`` 4×4 stride-2 convs with LeakyReLU, then a 4×4 conv to 1 logit."""
    widths = disc_widths(m)
    tree = {}
    for i in range(m.disc_depth):
        tree[f"conv{i}"] = {
            "w": ParamSpec((4, 4, widths[i], widths[i + 1]), "xavier"),
            "b": ParamSpec((widths[i + 1],), "zeros"),
        }
    tree["out"] = {"w": ParamSpec((4, 4, widths[-1], 1), "xavier"), "b": ParamSpec((1,), "zeros")}
    return tree


def spec_dit(c) -> Tree:
    """The latent diffusion transformer of a ``DiffusionConfig`` (maetok_jax/dit.py).

    Blocks are ``spec_block`` without its LayerNorm affines (adaLN supplies shift and
    scale) plus ``ada``, one dense from the conditioning vector to the six modulations
    [shift₁ | scale₁ | gate₁ | shift₂ | scale₂ | gate₂]. ``ada``, ``final_ada`` and
    ``head`` start at zero (adaLN-Zero): every block is the identity and the predicted
    velocity is 0 at initialisation.
    """
    d = c.width
    block = {k: v for k, v in spec_block(d, c.mlp_ratio).items() if k not in ("ln1", "ln2")}
    block["ada"] = _dense(d, 6 * d, "zeros")
    return {
        "x_embed": _dense(c.token_dim, d),  # h → D per latent token
        "pos": ParamSpec((c.num_tokens, d), "normal"),  # learned absolute positions (L, D)
        "t_mlp": {"fc1": _dense(c.time_freq_dim, d), "fc2": _dense(d, d)},
        "y_embed": ParamSpec((c.num_classes + 1, d), "normal"),  # last row: the null class
        "blocks": _stack(c.depth, block),
        "final_ada": _dense(d, 2 * d, "zeros"),  # [shift | scale] of the final LayerNorm
        "head": _dense(d, c.token_dim, "zeros"),  # D → h, the velocity
    }


def init_dit(c, seed: int) -> Tree:
    """The DiT's parameters as float32 numpy arrays."""
    return init_tree(spec_dit(c), seed, "dit")


# ------------------------------------------------------------------------------ initialiser


def _init_leaf(spec: ParamSpec, path: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(path.encode())])
    shape = spec.shape
    if spec.init == "zeros":
        return np.zeros(shape, np.float32)
    if spec.init == "ones":
        return np.ones(shape, np.float32)
    if spec.init == "normal":
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)
    if spec.init == "xavier":
        if len(shape) == 4:  # conv kernel (kh, kw, in, out)
            fan_in, fan_out = shape[0] * shape[1] * shape[2], shape[0] * shape[1] * shape[3]
        else:  # dense (in, out), possibly stacked (depth, in, out)
            fan_in, fan_out = shape[-2], shape[-1]
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, shape).astype(np.float32)
    if spec.init == "he":  # for layers followed by ReLU; fan_in = kh·kw·in or in
        fan_in = int(np.prod(shape[:-1])) if len(shape) == 4 else shape[-2]
        return (np.sqrt(2.0 / fan_in) * rng.standard_normal(shape)).astype(np.float32)
    raise ValueError(f"unknown init rule {spec.init!r} at {path}")


def init_tree(spec: Tree, seed: int, prefix: str) -> Tree:
    return map_with_path(lambda path, s: _init_leaf(s, path, seed), spec, prefix)


def init_params(cfg: Config | ModelConfig, seed: int) -> Tree:
    """The tokenizer's parameters as float32 numpy arrays, identical for every backend."""
    m = cfg.model if isinstance(cfg, Config) else cfg
    return init_tree(spec_params(m), seed, "params")


def init_disc(cfg: Config | ModelConfig, seed: int) -> Tree:
    m = cfg.model if isinstance(cfg, Config) else cfg
    return init_tree(spec_disc(m), seed, "disc")


def count(tree: Tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in leaves(tree))

"""Configuration: frozen, hashable dataclasses with a JSON round trip and validation.

Three parts, stored together in every checkpoint:

- ``ModelConfig``: shapes of the tokenizer (docs/design.md §3, §8).
- ``LossConfig``: loss terms and weights (docs/design.md §4–5).
- ``TrainConfig``: optimiser, schedules, masking, batch (docs/design.md §6–7).

The dataclasses are frozen so they can be static arguments under ``jax.jit`` and so a
config can never change under a running train step. Bad values raise ``ConfigError``
with a message that names the field and what would be valid.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from maetok.errors import ConfigError

BUILTIN_TARGETS = ("hog", "conv", "pixel")
# Field metadata of the settings that change neither the parameter tree nor the numbers a
# trained model computes (beyond rounding): see ``compute_only``.
COMPUTE_ONLY = {"compute_only": True}
REMAT_MODES = ("none", "full", "dots", "dots_attn", "dots_gelu")


@dataclass(frozen=True)
class ModelConfig:
    image_size: int = 256  # H = W, pixels
    channels: int = 3  # C
    patch_size: int = 16  # p
    num_latent_tokens: int = 128  # L
    latent_dim: int = 32  # width of each latent token h
    enc_width: int = 256  # D_enc
    enc_depth: int = 12
    enc_heads: int = 8
    dec_width: int = 256  # D_dec
    dec_depth: int = 8
    dec_heads: int = 8
    mlp_ratio: int = 4  # hidden width of each MLP = mlp_ratio * D
    rope_theta: float = 100.0  # base of the axial 2D RoPE frequencies
    ln_eps: float = 1e-6  # LayerNorm epsilon, pinned in both backends
    aux_targets: tuple[str, ...] = BUILTIN_TARGETS  # one auxiliary decoder per target
    aux_kind: str = "vit"  # "vit": shallow ViT on h; "mlp": 3-layer MLP on decoder features
    aux_width: int = 192
    aux_depth: int = 3
    aux_heads: int = 3
    aux_mlp_hidden: int = 256  # hidden width of the "mlp" aux heads
    disc_width: int = 64  # patch-GAN: first conv width, doubled at each stride-2 conv
    disc_depth: int = 3  # number of stride-2 convs
    # How the model computes, not what its parameters are or (beyond rounding) what it
    # outputs: compute-only fields (``compute_only``), which a checkpoint's user may change,
    # each a switch that ``benchmarks/train_step.py --set model.X=...`` can turn off to
    # measure it.
    # "float32" or "bfloat16"; parameters stay float32
    compute_dtype: str = field(default="float32", metadata=COMPUTE_ONLY)
    # "plain" (explicit softmax), "fused" (framework kernel: cuDNN in JAX, SDPA in torch) or
    # "flash" (JAX: the Pallas flash kernel, no atomic additions in its backward; torch: SDPA)
    attention: str = field(default="plain", metadata=COMPUTE_ONLY)
    # JAX: blocks per lax.scan iteration (compile time vs scheduling freedom)
    unroll: int = field(default=1, metadata=COMPUTE_ONLY)
    # Recompute in the backward pass: "none"; "full" (every block internal); "dots" (keep the
    # dense matmul outputs (JAX: and the bf16 LayerNorm statistics), recompute LayerNorm,
    # GELU, RoPE, attention); "dots_attn" (also keep the attention output); "dots_gelu" (also
    # keep the MLP's GELU output). Old configs' true/false read as "full"/"none".
    remat: str = field(default="none", metadata=COMPUTE_ONLY)
    # bf16 compute: LayerNorm and GELU keep bf16 activations with float32 statistics and save
    # only their bf16 input for the backward pass (float32 compute: no effect).
    lowp_norm: bool = field(default=True, metadata=COMPUTE_ONLY)
    # q, k and v from their own matmuls, built in the attention kernel's layout and rotated
    # there; off: one (D, 3D) matmul split afterwards. The same numbers up to rounding.
    split_qkv: bool = field(default=True, metadata=COMPUTE_ONLY)
    # bf16 compute: the fixed convolutions (targets, perceptual pyramid) in bf16 at default
    # precision; off, or float32 compute: float32 at the highest precision.
    fast_filters: bool = field(default=True, metadata=COMPUTE_ONLY)
    # ViT auxiliary decoders of equal shapes run as one stacked computation (their parameters
    # stacked at call time); off: one after the other.
    stack_aux: bool = field(default=True, metadata=COMPUTE_ONLY)
    # torch.compile (``--compile``): "block" compiles the transformer block once and reuses it
    # across depth and stacks; "parts" also compiles the step's other parts once each
    # (targets, losses) and the optimiser update leaf by leaf (one dynamic-shape kernel);
    # "step" compiles the whole train step (minutes).
    compile_scope: str = field(default="block", metadata=COMPUTE_ONLY)
    # Latent decoders: add a learnable absolute position (N, D) to the shared query e. Off,
    # positions are told apart by RoPE alone (docs/design.md §3.4); on, training converges faster.
    query_pos: bool = False

    @property
    def grid(self) -> int:
        """Patches per side, H / p."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """N, the number of image tokens."""
        return self.grid * self.grid

    @property
    def patch_dim(self) -> int:
        """p·p·C, the length of one flattened patch."""
        return self.patch_size * self.patch_size * self.channels


@dataclass(frozen=True)
class LossConfig:
    rec: str = "mse"  # "mse" or "l1"
    lambda_percep: float = 1.0  # λ1
    percep_warmup: int = 0  # Stage 1: λ1 ramps linearly from 0 over this many steps (0: none)
    lambda_adv: float = 0.4  # λ2
    use_adv: bool = False  # train the patch-GAN discriminator and add L_adv
    disc_start: int = 0  # step from which L_adv and the discriminator update are on
    adaptive_weight: bool = False  # scale L_adv by ‖∇L_tok‖/‖∇L_adv‖ at the last layer
    lecam_weight: float = 0.001
    lecam_decay: float = 0.999
    # γ_j per auxiliary target as (name, weight) pairs; a target not listed gets 1.0.
    gamma: tuple[tuple[str, float], ...] = ()

    def gamma_for(self, name: str) -> float:
        return dict(self.gamma).get(name, 1.0)


@dataclass(frozen=True)
class TrainConfig:
    stage: int = 1  # 1: masked training with aux decoders; 2: encoder frozen, annealed masks
    steps: int = 1000
    batch_size: int = 32
    seed: int = 0
    optimizer: str = "adamw"  # "adamw", "adam" or "sgd"
    lr: float = 1e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 1e-4  # decoupled for adamw; L2 added to the gradient for adam/sgd
    momentum: float = 0.9  # sgd only; 0 disables
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # "cosine" or "constant" after warm-up
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    ema_decay: float = 0.9999  # parameter EMA; 0 disables
    # decay at step s: min(ema_decay, (1 + s)/(EMA_WARMUP + s)) (maetok/numerics.py), so the
    # EMA forgets the weights it started from however short the run
    ema_warmup: bool = True
    disc_lr: float = 1e-4
    mask_min: float = 0.4  # stage 1: r ~ U[mask_min, mask_max] per step
    mask_max: float = 0.6
    mask_mode: str = "bernoulli"  # "bernoulli" per token or "exact" ceil(N·r) per image
    anneal_start: float = 0.6  # stage 2: r goes from anneal_start to 0
    anneal_steps: int = 1000
    anneal_schedule: str = "linear"  # "linear", "cosine" or "exponential"
    # Cadences of the trainer's output: what it writes, never what it computes.
    log_every: int = field(default=10, metadata=COMPUTE_ONLY)
    ckpt_every: int = field(default=500, metadata=COMPUTE_ONLY)
    sample_every: int = field(default=500, metadata=COMPUTE_ONLY)
    # GPU kernels chosen for run-to-run bit-identical results (maetok/reproducible.py);
    # False trades that for speed (``maetok train --nondeterministic``).
    deterministic: bool = field(default=True, metadata=COMPUTE_ONLY)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def replace(self, **parts: Mapping[str, Any]) -> Config:
        """Return a copy with fields changed, e.g. ``cfg.replace(train={"steps": 10})``."""
        new = {}
        for part, changes in parts.items():
            if part not in ("model", "loss", "train"):
                raise ConfigError(f"unknown config section {part!r}; use model, loss or train")
            new[part] = _replace_checked(getattr(self, part), changes, part)
        return validate(dataclasses.replace(self, **new))

    def to_dict(self) -> dict:
        return {
            "model": _section_to_dict(self.model),
            "loss": _section_to_dict(self.loss),
            "train": _section_to_dict(self.train),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Config:
        if not isinstance(d, Mapping):
            raise ConfigError(
                f"a config is an object with sections model, loss and train, got {d!r}"
            )
        unknown = set(d) - {"model", "loss", "train"}
        if unknown:
            raise ConfigError(
                f"unknown config section(s) {sorted(unknown)}; use model, loss, train"
            )
        parts = {}
        for name, cls in (("model", ModelConfig), ("loss", LossConfig), ("train", TrainConfig)):
            parts[name] = _replace_checked(cls(), d.get(name, {}), name)
        return validate(Config(**parts))

    @staticmethod
    def from_json(text: str) -> Config:
        return Config.from_dict(parse_json(text))


def compute_only(section) -> frozenset[str]:
    """The fields of a config section (a dataclass or its instance) marked compute-only: how
    the model computes or how often the trainer writes, never what the parameters are or
    (beyond rounding) what a trained model computes. A checkpoint saved with other values of
    these loads as is, and a resumed run may change them."""
    return frozenset(f.name for f in dataclasses.fields(section) if f.metadata.get("compute_only"))


def parse_json(text: str) -> dict:
    """The JSON object in ``text``; ConfigError if it is not valid JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config is not valid JSON: {e}") from e


def _section_to_dict(section) -> dict:
    d = dataclasses.asdict(section)
    if "gamma" in d:
        d["gamma"] = {k: v for k, v in section.gamma}
    if "aux_targets" in d:
        d["aux_targets"] = list(section.aux_targets)
    return d


def _replace_checked(section, changes: Mapping[str, Any], where: str):
    if not isinstance(changes, Mapping):
        raise ConfigError(
            f"config section {where!r} must be an object of FIELD: VALUE, got {changes!r}"
        )
    names = {f.name: f for f in dataclasses.fields(section)}
    unknown = set(changes) - set(names)
    if unknown:
        raise ConfigError(
            f"unknown {where} option(s) {sorted(unknown)}; known: {', '.join(sorted(names))}"
        )
    fixed = {}
    for key, value in changes.items():
        fixed[key] = _typed(f"{where}.{key}", getattr(section, key), value)
    return dataclasses.replace(section, **fixed)


def _number(name: str, value, kind: str = "a number") -> float:
    """A finite int or float (not a bool, not a string), else ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be {kind}, got {value!r}")
    return value


def _typed(name: str, default, value):
    """``value`` converted to the type of the field's ``default``; ConfigError if it is not one."""
    if name.endswith(".gamma"):
        if isinstance(value, Mapping):
            items = value.items()
        elif isinstance(value, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 for p in value
        ):
            items = value
        else:
            raise ConfigError(
                f'{name} must map target names to weights, e.g. {{"hog": 0.5}}, got {value!r}'
            )
        return tuple(sorted((str(k), float(_number(f"{name}[{k!r}]", v))) for k, v in items))
    if name.endswith(".aux_targets"):
        if isinstance(value, str):
            value = [t for t in value.split(",") if t]
        if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) for t in value):
            raise ConfigError(
                f"{name} must be a list of target names (or one comma-separated "
                f"string), got {value!r}"
            )
        return tuple(value)
    if name == "model.remat" and isinstance(value, bool):  # configs before the modes
        return "full" if value else "none"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if not float(_number(name, value, "an integer")).is_integer():
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        return int(value)
    if isinstance(default, float):
        return float(_number(name, value))
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _choice(value: str, options: tuple[str, ...], name: str) -> None:
    _require(value in options, f"{name} must be one of {', '.join(options)}; got {value!r}")


def validate(cfg: Config) -> Config:
    """Reject impossible configurations with a message naming the field; return ``cfg``."""
    from maetok.targets import known_targets, target_dim  # late import: targets reads config

    m, lo, t = cfg.model, cfg.loss, cfg.train
    for name in (
        "image_size",
        "channels",
        "patch_size",
        "num_latent_tokens",
        "latent_dim",
        "enc_width",
        "enc_depth",
        "enc_heads",
        "dec_width",
        "dec_depth",
        "dec_heads",
        "mlp_ratio",
        "aux_width",
        "aux_depth",
        "aux_heads",
        "aux_mlp_hidden",
        "disc_width",
        "disc_depth",
    ):
        _require(getattr(m, name) > 0, f"model.{name} must be positive, got {getattr(m, name)}")
    _require(
        m.image_size % m.patch_size == 0,
        f"model.image_size {m.image_size} is not divisible by model.patch_size {m.patch_size}",
    )
    for part in ("enc", "dec", "aux"):
        width, heads = getattr(m, f"{part}_width"), getattr(m, f"{part}_heads")
        _require(
            width % heads == 0,
            f"model.{part}_heads {heads} does not divide model.{part}_width {width}",
        )
        _require(
            (width // heads) % 4 == 0,
            f"model.{part} head dim {width // heads} must be a multiple of 4 "
            "(2D RoPE rotates pairs of dims, half for rows and half for columns)",
        )
    _require(m.rope_theta > 1.0, f"model.rope_theta must be > 1, got {m.rope_theta}")
    _require(m.ln_eps > 0, f"model.ln_eps must be positive, got {m.ln_eps}")
    _choice(m.aux_kind, ("vit", "mlp"), "model.aux_kind")
    _choice(m.compute_dtype, ("float32", "bfloat16"), "model.compute_dtype")
    _choice(m.attention, ("plain", "fused", "flash"), "model.attention")
    _require(m.unroll >= 1, f"model.unroll must be ≥ 1, got {m.unroll}")
    _choice(m.remat, REMAT_MODES, "model.remat")
    _choice(m.compile_scope, ("block", "parts", "step"), "model.compile_scope")
    _require(
        len(set(m.aux_targets)) == len(m.aux_targets),
        f"model.aux_targets has duplicates: {list(m.aux_targets)}",
    )
    for name in m.aux_targets:
        _require(
            name in known_targets(),
            f"unknown auxiliary target {name!r}; known: {', '.join(known_targets())}",
        )
    if "hog" in m.aux_targets:
        target_dim("hog", m)  # raises if the patch size does not fit HOG cells
    _require(
        m.image_size >= 2 ** (m.disc_depth + 1),
        f"model.image_size {m.image_size} is too small for a {m.disc_depth}-level discriminator",
    )

    _choice(lo.rec, ("mse", "l1"), "loss.rec")
    for name in ("lambda_percep", "lambda_adv", "lecam_weight"):
        _require(getattr(lo, name) >= 0, f"loss.{name} must be >= 0, got {getattr(lo, name)}")
    _require(lo.percep_warmup >= 0, f"loss.percep_warmup must be >= 0, got {lo.percep_warmup}")
    _require(0 <= lo.lecam_decay < 1, f"loss.lecam_decay must be in [0, 1), got {lo.lecam_decay}")
    _require(lo.disc_start >= 0, f"loss.disc_start must be >= 0, got {lo.disc_start}")
    for name, weight in lo.gamma:
        _require(
            name in m.aux_targets,
            f"loss.gamma names {name!r}, which is not in model.aux_targets {list(m.aux_targets)}",
        )
        _require(weight >= 0, f"loss.gamma[{name!r}] must be >= 0, got {weight}")

    _require(t.stage in (1, 2), f"train.stage must be 1 or 2, got {t.stage}")
    _require(t.steps >= 0, f"train.steps must be >= 0, got {t.steps}")
    _require(t.batch_size > 0, f"train.batch_size must be positive, got {t.batch_size}")
    _choice(t.optimizer, ("adamw", "adam", "sgd"), "train.optimizer")
    _choice(t.lr_schedule, ("cosine", "constant"), "train.lr_schedule")
    _choice(t.mask_mode, ("bernoulli", "exact"), "train.mask_mode")
    _choice(t.anneal_schedule, ("linear", "cosine", "exponential"), "train.anneal_schedule")
    _require(t.lr > 0 and t.disc_lr > 0, "train.lr and train.disc_lr must be positive")
    _require(0 <= t.b1 < 1 and 0 <= t.b2 < 1, f"train.b1/b2 must be in [0, 1), got {t.b1}, {t.b2}")
    _require(t.eps > 0, f"train.eps must be positive, got {t.eps}")
    _require(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    _require(0 <= t.momentum < 1, f"train.momentum must be in [0, 1), got {t.momentum}")
    _require(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables), got {t.grad_clip}")
    _require(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    _require(
        0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}"
    )
    _require(0 <= t.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    for name in ("mask_min", "mask_max", "anneal_start"):
        value = getattr(t, name)
        _require(0.0 <= value <= 1.0, f"train.{name} must be a mask ratio in [0, 1], got {value}")
    _require(
        t.mask_min <= t.mask_max,
        f"train.mask_min {t.mask_min} is larger than train.mask_max {t.mask_max}",
    )
    _require(t.anneal_steps >= 0, f"train.anneal_steps must be >= 0, got {t.anneal_steps}")
    for name in ("log_every", "ckpt_every", "sample_every"):
        _require(getattr(t, name) > 0, f"train.{name} must be positive, got {getattr(t, name)}")
    return cfg


# docs/design.md §8. Each preset lists only what differs from the dataclass defaults. Train
# settings differ by use: `tiny` is sized for tests and CPU demos.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "model": dict(
            image_size=32,
            patch_size=4,
            num_latent_tokens=16,
            latent_dim=8,
            enc_width=64,
            enc_depth=2,
            enc_heads=4,
            dec_width=64,
            dec_depth=2,
            dec_heads=4,
            aux_width=32,
            aux_depth=1,
            aux_heads=2,
            aux_mlp_hidden=64,
            disc_width=16,
            disc_depth=2,
        ),
        "train": dict(
            batch_size=16,
            steps=300,
            lr=1e-3,
            warmup_steps=20,
            ema_decay=0.99,
            anneal_steps=300,
            ckpt_every=100,
            sample_every=100,
        ),
    },
    # The ModelConfig defaults: 256² images, 16-px patches, 128 tokens × 32, width 256.
    "seed": {"train": dict(lr=3e-4, warmup_steps=200)},
    # CIFAR-10 (32²) for the diffusability study: 4-px patches (an 8×8 grid, as in the
    # 256²/16 setting), 16 tokens × 8 channels = 128 numbers for 3,072 pixel values, a 24×
    # compression in the middle of the 12–48× range of the 256² tokenizers. Short token
    # sequences keep the latent diffusion model cheap.
    "cifar": {
        "model": dict(
            image_size=32,
            patch_size=4,
            num_latent_tokens=16,
            latent_dim=8,
            enc_depth=6,
            enc_heads=4,
            dec_depth=6,
            dec_heads=4,
            aux_width=128,
            aux_depth=2,
            aux_heads=2,
            disc_width=32,
            disc_depth=2,
            query_pos=True,
        ),
        "train": dict(
            batch_size=256,
            steps=6000,
            lr=1e-3,
            warmup_steps=300,
            ema_decay=0.999,
            log_every=100,
            ckpt_every=1000,
            sample_every=1000,
        ),
    },
    # `seed`'s tokens at width 768 (12 heads) and a 12-block decoder.
    "base": {
        "model": dict(enc_width=768, enc_heads=12, dec_width=768, dec_depth=12, dec_heads=12),
        "train": dict(batch_size=64, warmup_steps=500),
    },
}


def preset(name: str, **overrides: Mapping[str, Any]) -> Config:
    """The preset ``name`` (``tiny``, ``seed``, ``base``) with optional section overrides."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    cfg = Config.from_dict(PRESETS[name])
    return cfg.replace(**overrides) if overrides else cfg

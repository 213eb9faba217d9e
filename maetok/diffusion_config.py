"""Configuration of the latent diffusion model: one frozen dataclass, JSON, presets.

``DiffusionConfig`` holds the DiT's shapes, the flow-matching training recipe and the
sampling defaults in one flat section, so ``--set field=value`` needs no section name and
the config itself is the ``t_cfg`` that ``maetok_jax.optim`` and ``maetok.schedules`` read
(``lr``, ``b1``, ``b2``, ``eps``, ``weight_decay``, ``warmup_steps``, ``lr_schedule``, ...).
It is frozen, hence hashable and usable as a static argument under ``jax.jit``; bad values
raise ``ConfigError`` naming the field, as ``maetok.config`` does for the tokenizer.

``num_tokens`` and ``token_dim`` describe the latents (L, h) and are set from the
tokenizer's config by the command line; the presets only size the generator and its run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from maetok.config import _choice, _replace_checked, _require, parse_json
from maetok.errors import ConfigError

SAMPLERS = ("euler", "heun")
TIME_SAMPLING = ("uniform", "logit_normal")


@dataclass(frozen=True)
class DiffusionConfig:
    # ---- model: a DiT with adaLN-Zero blocks over the latent sequence (B, L, h)
    num_tokens: int = 64  # L, latent tokens per image (the tokenizer's num_latent_tokens)
    token_dim: int = 16  # h, channels per latent token (the tokenizer's latent_dim)
    width: int = 384  # D
    depth: int = 6  # number of blocks
    heads: int = 6  # attention heads; D / heads is the head dim K
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio · D
    num_classes: int = 10  # label == num_classes is the null class (dropped label)
    time_freq_dim: int = 256  # sinusoidal features of t fed to the time MLP
    ln_eps: float = 1e-6  # LayerNorm epsilon
    compute_dtype: str = "bfloat16"  # "float32" or "bfloat16"; parameters stay float32
    attention: str = "plain"  # "plain" (explicit softmax) or "fused" (framework kernel)
    # ---- training: flow matching, AdamW, EMA
    steps: int = 20000
    batch_size: int = 256
    lr: float = 3e-4  # peak learning rate, reached after warm-up
    warmup_steps: int = 500  # linear warm-up from lr / warmup_steps
    lr_schedule: str = "constant"  # "constant" or "cosine" after warm-up
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    b1: float = 0.9
    # 0.99 rather than 0.95: the flow-matching gradient is very noisy (a random t and noise
    # per sample), and a ~100-step second-moment average keeps the step size steadier than a
    # ~20-step one, while still tracking the early changes of gradient scale within warm-up.
    b2: float = 0.99
    eps: float = 1e-8  # Adam denominator epsilon
    weight_decay: float = 0.0  # decoupled (AdamW)
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    ema_decay: float = 0.999  # EMA of the parameters, used for sampling; 0 keeps the last
    label_dropout: float = 0.1  # probability of training on the null class (guidance)
    time_sampling: str = "logit_normal"  # "uniform" t ~ U[0, 1] or sigmoid(N(mean, std))
    logit_mean: float = 0.0  # logit_normal: mean of the normal before the sigmoid
    logit_std: float = 1.0  # logit_normal: its standard deviation
    seed: int = 0  # initial parameters, batches, times, noise and label drops
    log_every: int = 100  # steps between pulls of the metrics to the host
    ckpt_every: int = 5000  # steps between checkpoints (and one at the end)
    # ---- sampling defaults (each overridable on the command line)
    sampler: str = "heun"  # "euler" or "heun"
    sample_steps: int = 50  # ODE steps from noise (t = 0) to data (t = 1)
    guidance: float = 1.5  # classifier-free guidance scale g; 1 is the conditional model

    @property
    def optimizer(self) -> str:
        """What ``maetok_jax.optim`` reads: always AdamW here."""
        return "adamw"

    def replace(self, **changes: Any) -> DiffusionConfig:
        """A validated copy with fields changed, e.g. ``cfg.replace(steps=10)``."""
        return validate(_replace_checked(self, changes, "diffusion"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> DiffusionConfig:
        return DiffusionConfig().replace(**d)

    @staticmethod
    def from_json(text: str) -> DiffusionConfig:
        d = parse_json(text)
        if not isinstance(d, dict):
            raise ConfigError(f"a diffusion config is a JSON object, got {type(d).__name__}")
        return DiffusionConfig.from_dict(d)


def validate(c: DiffusionConfig) -> DiffusionConfig:
    """Reject impossible configurations with a message naming the field; return ``c``."""
    for name in (
        "num_tokens",
        "token_dim",
        "width",
        "depth",
        "heads",
        "mlp_ratio",
        "num_classes",
        "time_freq_dim",
        "batch_size",
        "log_every",
        "ckpt_every",
        "sample_steps",
    ):
        _require(getattr(c, name) > 0, f"diffusion.{name} must be positive, got {getattr(c, name)}")
    _require(
        c.width % c.heads == 0,
        f"diffusion.heads {c.heads} does not divide diffusion.width {c.width}",
    )
    _require(
        c.time_freq_dim % 2 == 0,
        f"diffusion.time_freq_dim must be even (cos and sin halves), got {c.time_freq_dim}",
    )
    _require(c.ln_eps > 0, f"diffusion.ln_eps must be positive, got {c.ln_eps}")
    _choice(c.compute_dtype, ("float32", "bfloat16"), "diffusion.compute_dtype")
    _choice(c.attention, ("plain", "fused"), "diffusion.attention")
    _require(c.steps >= 0, f"diffusion.steps must be >= 0, got {c.steps}")
    _require(c.lr > 0, f"diffusion.lr must be positive, got {c.lr}")
    _require(c.warmup_steps >= 0, f"diffusion.warmup_steps must be >= 0, got {c.warmup_steps}")
    _choice(c.lr_schedule, ("constant", "cosine"), "diffusion.lr_schedule")
    _require(
        0 <= c.min_lr_ratio <= 1, f"diffusion.min_lr_ratio must be in [0, 1], got {c.min_lr_ratio}"
    )
    for name in ("b1", "b2", "ema_decay", "label_dropout"):
        value = getattr(c, name)
        _require(0 <= value < 1, f"diffusion.{name} must be in [0, 1), got {value}")
    _require(c.eps > 0, f"diffusion.eps must be positive, got {c.eps}")
    _require(c.weight_decay >= 0, f"diffusion.weight_decay must be >= 0, got {c.weight_decay}")
    _require(c.grad_clip >= 0, f"diffusion.grad_clip must be >= 0 (0 disables), got {c.grad_clip}")
    _choice(c.time_sampling, TIME_SAMPLING, "diffusion.time_sampling")
    _require(c.logit_std > 0, f"diffusion.logit_std must be positive, got {c.logit_std}")
    _choice(c.sampler, SAMPLERS, "diffusion.sampler")
    _require(c.guidance >= 0, f"diffusion.guidance must be >= 0, got {c.guidance}")
    return c


# ``tiny`` is sized for tests and CPU demos; ``small`` is the CIFAR-10 study's generator
# (about 16 M parameters; a few minutes for 20k steps at batch 256 on one H200).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        num_tokens=16,
        token_dim=8,
        width=64,
        depth=2,
        heads=4,
        time_freq_dim=32,
        compute_dtype="float32",
        steps=300,
        batch_size=64,
        lr=1e-3,
        warmup_steps=20,
        ema_decay=0.99,
        log_every=10,
        ckpt_every=100,
        sample_steps=16,
    ),
    "small": dict(
        width=384,
        depth=6,
        heads=6,
        steps=20000,
        batch_size=256,
        lr=3e-4,
        warmup_steps=500,
        ema_decay=0.999,
        log_every=100,
        ckpt_every=5000,
    ),
}


def preset(name: str, **changes: Any) -> DiffusionConfig:
    """The preset ``name`` (``tiny``, ``small``) with optional field changes."""
    if name not in PRESETS:
        raise ConfigError(f"unknown diffusion preset {name!r}; choose one of {', '.join(PRESETS)}")
    return DiffusionConfig().replace(**{**PRESETS[name], **changes})

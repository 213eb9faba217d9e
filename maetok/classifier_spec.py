"""The CIFAR-10 classifier's configuration and parameter tree (framework-free).

A ResNet-9-style network in the manner of the fast CIFAR-10 training recipes: a 3×3
conv stem, three stages (conv → BN → ReLU → 2×2 max-pool), residual pairs of convs after
the first and the last stage, global max-pooling and a linear head scaled by
``logit_scale``. Every conv has no bias (a BatchNorm follows it) and He-normal weights.

Its pooled penultimate vector (``widths[-1]`` values) is the feature space in which the
study measures generated images (``fd_c10``, precision, recall), so this file and the
checkpoint format are a contract: a changed tree means a new checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from maetok.errors import ConfigError
from maetok.params import ParamSpec, init_tree
from maetok.tree import Tree, flatten, unflatten

# (stage, has a residual pair); the stem is widths[0], the stages widths[1:]
STAGES = (("layer1", True), ("layer2", False), ("layer3", True))
FORMAT = "maetok-classifier/1"


@dataclass(frozen=True)
class ClassifierConfig:
    widths: tuple[int, ...] = (64, 128, 256, 512)  # stem, then stages 1–3
    num_classes: int = 10
    epochs: int = 18
    batch_size: int = 512
    lr: float = 0.4  # one-cycle peak, for the mean loss over the batch
    warmup_fraction: float = 0.25  # share of the steps spent rising to lr
    momentum: float = 0.9  # Nesterov
    weight_decay: float = 5e-4  # L2 through the gradient, on every parameter
    label_smoothing: float = 0.2
    logit_scale: float = 0.125  # keeps the initial logits small with max-pooled features
    bn_momentum: float = 0.9  # running ← m·running + (1 − m)·batch statistic
    bn_eps: float = 1e-5
    pad: int = 4  # random-crop padding in pixels (reflected)
    seed: int = 0
    compute_dtype: str = "bfloat16"  # "float32" or "bfloat16" (parameters stay float32)

    def __post_init__(self):
        if len(self.widths) != 1 + len(STAGES) or min(self.widths) < 1:
            raise ConfigError(
                f"classifier widths must be {1 + len(STAGES)} positive numbers "
                f"(stem and {len(STAGES)} stages), got {self.widths}"
            )
        for name, low in (("num_classes", 2), ("epochs", 1), ("batch_size", 1)):
            if getattr(self, name) < low:
                raise ConfigError(
                    f"classifier {name} must be at least {low}, got {getattr(self, name)}"
                )
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ConfigError(
                f"classifier compute_dtype must be float32 or bfloat16, got {self.compute_dtype!r}"
            )
        if not (
            self.lr > 0
            and 0 <= self.momentum < 1
            and self.weight_decay >= 0
            and 0 <= self.label_smoothing < 1
            and 0 < self.warmup_fraction < 1
            and 0 <= self.bn_momentum < 1
            and self.pad >= 0
        ):
            raise ConfigError(f"impossible classifier optimisation settings: {self}")

    @property
    def optimizer(self) -> str:
        """Read by ``maetok_jax.optim.make_optimizer``: this network trains with SGD only."""
        return "sgd"

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    def replace(self, **changes) -> ClassifierConfig:
        return ClassifierConfig(**{**asdict(self), **changes})

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ClassifierConfig:
        try:
            data = json.loads(text)
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(data) - known)
            if unknown:
                raise ConfigError(f"unknown classifier config field(s) {unknown}")
            data["widths"] = tuple(data.get("widths", cls.widths))
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as e:
            raise ConfigError(f"unreadable classifier config: {e}") from e


def _conv_bn(c_in: int, c_out: int) -> Tree:
    return {
        "conv": {"w": ParamSpec((3, 3, c_in, c_out), "he")},
        "bn": {"scale": ParamSpec((c_out,), "ones"), "bias": ParamSpec((c_out,), "zeros")},
    }


def spec_classifier(cfg: ClassifierConfig) -> Tree:
    """The trainable tree: ``stem``, ``layer1..3`` (each ``conv``/``bn``, optional ``res1``,
    ``res2``) and ``head/w`` (widths[-1], num_classes)."""
    tree = {"stem": _conv_bn(3, cfg.widths[0])}
    for (name, residual), c_in, c_out in zip(STAGES, cfg.widths[:-1], cfg.widths[1:]):
        stage = _conv_bn(c_in, c_out)
        if residual:
            stage["res1"] = _conv_bn(c_out, c_out)
            stage["res2"] = _conv_bn(c_out, c_out)
        tree[name] = stage
    tree["head"] = {"w": ParamSpec((cfg.widths[-1], cfg.num_classes), "xavier")}
    return tree


def spec_classifier_stats(cfg: ClassifierConfig) -> Tree:
    """BatchNorm running statistics, one ``{mean, var}`` per ``bn`` of the parameter tree."""
    stats = {}
    for path, spec in flatten(spec_classifier(cfg)).items():
        if path.endswith("/bn/scale"):
            bn = path.removesuffix("scale")
            stats[bn + "mean"], stats[bn + "var"] = (
                ParamSpec(spec.shape, "zeros"),
                ParamSpec(spec.shape, "ones"),
            )
    return unflatten(stats)


def init_classifier(cfg: ClassifierConfig) -> tuple[Tree, Tree]:
    """``(params, stats)`` as float32 numpy trees from the shared initialiser."""
    return (
        init_tree(spec_classifier(cfg), cfg.seed, "classifier"),
        init_tree(spec_classifier_stats(cfg), cfg.seed, "classifier_stats"),
    )

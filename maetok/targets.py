"""Auxiliary-target dimensions: the framework-free half of the target registry (docs/design.md §4).

Each backend keeps the functions that compute a target (``images → (B, N, D_j)``) in the
``TARGETS`` table of its own ``targets`` module; this module records each target's width
``D_j`` so the config can be validated and the parameter tree sized without importing a
framework, and holds the table operations both backends share.
"""

from __future__ import annotations

from collections.abc import Callable

from maetok.errors import ConfigError

GABOR_SCALES = (1.0, 2.0)  # σ of the Gabor envelopes, pixels
GABOR_ORIENTATIONS = 4  # orientations over [0, π)
HOG_BINS = 9


def hog_cell(patch_size: int) -> int:
    """Side of one HOG cell: 8 pixels (docs/design.md §4), or the whole patch when p < 8."""
    return 8 if patch_size >= 8 else patch_size


def _hog_dim(m) -> int:
    cell = hog_cell(m.patch_size)
    if m.patch_size % cell:
        raise ConfigError(
            f"HOG target needs model.patch_size to be a multiple of its {cell}-pixel cell, "
            f"got {m.patch_size}; drop 'hog' from model.aux_targets or change the patch size"
        )
    return m.channels * HOG_BINS * (m.patch_size // cell) ** 2


_DIMS: dict[str, Callable] = {
    "hog": _hog_dim,
    "conv": lambda m: m.channels * len(GABOR_SCALES) * GABOR_ORIENTATIONS,
    "pixel": lambda m: m.patch_dim,
}


def register_target_dim(name: str, dim: Callable | int) -> None:
    """Declare a user target's width ``D_j`` (an int or a function of the ModelConfig)."""
    _DIMS[name] = dim if callable(dim) else (lambda m, d=int(dim): d)


def known_targets() -> tuple[str, ...]:
    return tuple(_DIMS)


def target_dim(name: str, model_cfg) -> int:
    if name not in _DIMS:
        raise ConfigError(f"unknown auxiliary target {name!r}; known: {', '.join(_DIMS)}")
    return int(_DIMS[name](model_cfg))


def add_target(table: dict[str, Callable], name: str, fn: Callable, dim) -> None:
    """Put a user target ``fn(images (B,H,W,C), m) → (B, N, dim)`` into a backend's
    ``table`` and record its width; ``dim`` an int or fn(m)."""
    table[name] = fn
    register_target_dim(name, dim)


def check_implemented(table: dict[str, Callable], model_cfg, backend: str, module: str) -> None:
    """ConfigError unless every target of ``model_cfg.aux_targets`` has a function in ``table``."""
    missing = [n for n in model_cfg.aux_targets if n not in table]
    if missing:
        raise ConfigError(
            f"auxiliary target(s) {missing} have no {backend} implementation; "
            f"call {module}.register_target first"
        )

"""Constants built on the host (numpy) and kept on their device: one host→device copy per
constant, not one per step (a copy from pageable memory would also make the host wait for
the GPU, which an eager step, launch-bound on small models, pays in full).

Inside a whole-step ``torch.compile`` the constant is built afresh and becomes a constant
of the graph: a module-level tensor read inside the step's ``torch.func.grad`` region breaks
inductor (torch 2.13), and a cache mutated while tracing would hold traced tensors. A
compiled part (``maetok_torch.compiled``, scope "parts") reads the copy its eager first call
cached, as a graph input, so no numpy is traced.

The fixed kernels travel as ``Bank`` references (patch size, name, shape: Python values
only), so cache keys never hash an array inside a compiled region.
"""

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from maetok.filters import filter_banks
from maetok_torch.compiled import parts_compiled

_ON_DEVICE: dict = {}
_BANKS: dict = {}


class Bank(NamedTuple):
    """Kernel ``name`` of ``maetok.filters.filter_banks(patch_size)``, by reference."""

    patch_size: int
    name: str
    shape: tuple

    def array(self) -> np.ndarray:
        return filter_banks(self.patch_size)[self.name]


def bank(patch_size: int, name: str) -> Bank:
    """The ``Bank`` of kernel ``name`` (cached: a compiled part reads it as a constant)."""
    key = (patch_size, name)
    if key not in _BANKS:
        _BANKS[key] = Bank(patch_size, name, tuple(filter_banks(patch_size)[name].shape))
    return _BANKS[key]


def on_device(key: tuple, build: Callable[[], np.ndarray], device=None, dtype=None):
    """``build()`` as a tensor of ``dtype`` on ``device`` (CPU when None), cached by ``key``
    (which must name everything ``build`` depends on)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    full = (*key, str(dev), dtype)
    if torch.compiler.is_compiling() and not (parts_compiled() and full in _ON_DEVICE):
        return torch.as_tensor(build(), dtype=dtype, device=dev)
    if full not in _ON_DEVICE:
        _ON_DEVICE[full] = torch.as_tensor(build(), dtype=dtype, device=dev)
    return _ON_DEVICE[full]

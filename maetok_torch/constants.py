"""Constants built on the host (numpy) and kept on their device: one host→device copy per
constant, not one per step (a copy from pageable memory would also make the host wait for
the GPU, which an eager step, launch-bound on small models, pays in full).

Inside ``torch.compile`` the constant is built afresh and becomes a constant of the graph:
a module-level tensor read inside the step's ``torch.func.grad`` region breaks inductor
(torch 2.13), and a cache mutated while tracing would hold traced tensors.
"""

from collections.abc import Callable

import numpy as np
import torch

_ON_DEVICE: dict = {}


def on_device(key: tuple, build: Callable[[], np.ndarray], device=None, dtype=None):
    """``build()`` as a tensor of ``dtype`` on ``device`` (CPU when None), cached by ``key``
    (which must name everything ``build`` depends on)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if torch.compiler.is_compiling():
        return torch.as_tensor(build(), dtype=dtype, device=dev)
    full = (*key, str(dev), dtype)
    if full not in _ON_DEVICE:
        _ON_DEVICE[full] = torch.as_tensor(build(), dtype=dtype, device=dev)
    return _ON_DEVICE[full]

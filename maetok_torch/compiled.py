"""Parts of the train step under ``torch.compile``, each compiled once (``model.compile_scope``).

``compiling(backend, parts)`` is the context a compiled step runs in. Inside it every
transformer block runs through one compiled function, built once and reused across depth
and across the encoder, decoder and auxiliary stacks (one graph per distinct shape), so
compiling takes a block's time rather than the whole step's. With ``parts`` (scope
"parts") the functions marked ``@compiled_part`` — the auxiliary targets, the
reconstruction and perceptual loss, the masked loss — are compiled too, once each, and
the Adam/AdamW update runs leaf by leaf through one function compiled with dynamic shapes
(clip scale, update and EMA in one kernel per leaf; one compile serves every leaf), so the
elementwise work between the blocks is fused as well.

A part's first call runs eagerly: it puts the part's constants (filter matrices) on the
device, and from then on the compiled part reads them from ``maetok_torch.constants``'
cache as graph inputs instead of tracing the numpy that builds them. Outside the context
every function runs eagerly.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch

_COMPILED: dict = {}  # (function, backend) → the compiled function
_ACTIVE = {"blocks": False, "parts": False, "backend": "inductor"}


@contextlib.contextmanager
def compiling(backend="inductor", parts: bool = False):
    """Within this context the blocks (and with ``parts`` the marked parts) run compiled."""
    previous = dict(_ACTIVE)
    _ACTIVE.update(blocks=True, parts=parts, backend=backend)
    try:
        yield
    finally:
        _ACTIVE.update(previous)


def blocks_compiled() -> bool:
    return _ACTIVE["blocks"]


def parts_compiled() -> bool:
    return _ACTIVE["parts"]


def _key(fn: Callable) -> tuple:
    return fn, _ACTIVE["backend"]


def compiled(fn: Callable, dynamic: bool = False) -> Callable:
    """``fn`` compiled with the active backend, built once per function and backend;
    ``dynamic``: one graph for inputs of any size (the optimiser's per-leaf update)."""
    if _key(fn) not in _COMPILED:
        _COMPILED[_key(fn)] = torch.compile(fn, backend=_ACTIVE["backend"], dynamic=dynamic)
    return _COMPILED[_key(fn)]


def compiled_part(fn: Callable) -> Callable:
    """Mark ``fn`` as a part: compiled inside ``compiling(parts=True)`` from its second call
    on (the first, eager, puts its constants on the device), eager everywhere else."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if parts_compiled() and not torch.compiler.is_compiling():
            if _key(fn) in _COMPILED:
                return compiled(fn)(*args, **kwargs)
            compiled(fn)  # built now, first called (and traced) on the next call
        return fn(*args, **kwargs)

    return run

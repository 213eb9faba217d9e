"""MAETok in PyTorch: the same functions, names and parameter tree as ``maetok_jax``.

``MAETokParadigm`` and ``register`` (the Marble plugin, ``maetok_torch.marble``) are
exported lazily, so importing this package imports neither torch nor Marble.
"""

_LAZY = {"MAETokParadigm": "maetok_torch.marble", "register": "maetok_torch.marble"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'maetok_torch' has no attribute {name!r}")

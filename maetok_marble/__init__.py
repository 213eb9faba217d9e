"""MAETok as a learning-paradigm plugin for Marble, on the torch backend (docs/design.md §9).

``paradigm``: ``MAETokParadigm``, its hooks and ``register``; ``settings``: its options,
images and the statistics it reports. Marble itself is imported only by ``register``.
"""

from maetok_marble.paradigm import MAETokParadigm, MarbleNotInstalledError, register

__all__ = ["MAETokParadigm", "MarbleNotInstalledError", "register"]

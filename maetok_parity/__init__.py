"""The JAX-vs-torch parity checks, written once for the test suite and for ``maetok parity``.

A package of its own, beside ``maetok``, ``maetok_jax`` and ``maetok_torch``, because it is
the one place that imports both backends: the framework-free core ``maetok`` imports
neither, and ``parity_tests/`` is not installed, while ``maetok parity`` must work from an
installed project. ``maetok.parity`` keeps the numpy side (the tolerance table ``TOL``,
``rel_err`` and the tree errors) and the command's parser; the command imports
``maetok_parity.checks`` when it runs.

- ``harness``: a ``Case`` (config, device, seeded generator), conversions to each backend,
  the tree error behind every row, and the shared setup (``disc_off_margin``, pinned fp32).
- ``checks``: one small function per check, each returning rows ``(name, error,
  tolerance)``; ``REPORT`` lists those ``maetok parity`` runs, ``run`` runs them.
"""

import os

# Before jax is imported: torch shares the GPU, so JAX must not grab all of its memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

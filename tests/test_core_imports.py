"""The framework-free core: importing any module of ``maetok`` imports no backend.

A module that needs JAX or torch at run time imports it inside the function that uses it
(as ``maetok.trainer.get_backend`` does for the backend the user chose). Checked in a fresh
interpreter, where modules this test session has already imported cannot hide an import.
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import maetok

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("jax", "jaxlib", "torch", "maetok_jax", "maetok_torch", "maetok_parity")

PROBE = """
import importlib, json, sys
backends = tuple(sys.argv[2].split(","))
found = {}
for name in sys.argv[1].split(","):
    importlib.import_module(name)
    new = sorted(m for m in sys.modules if m.split(".")[0] in backends)
    if new:
        found[name] = new[:5]
        break
print(json.dumps(found))
"""


def test_core_modules_import_no_backend():
    names = ["maetok"] + [f"maetok.{m.name}" for m in pkgutil.iter_modules(maetok.__path__)]
    assert {"maetok.parity", "maetok.cli", "maetok.trainer", "maetok.synthetic"} <= set(names)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, ",".join(names), ",".join(BACKENDS)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        check=True,
    )
    found = json.loads(out.stdout)
    assert found == {}, (
        f"the first core module that imports a backend, and what it imports: {found}"
    )

"""Settings for a test session (``tests/`` and ``parity_tests/``), made before JAX starts."""

import os
import subprocess
import sys

# The suite runs tiny models on the CPU, where XLA spends most of its time compiling.
# LLVM's lowest optimisation level compiles about 30 % faster; XLA's older loop emitters
# for fusions compile the train step in half the time of its fusion emitters. Both compute
# the same float32 numbers up to rounding (XLA's CPU fast math stays off).
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def _accepted(flags: list[str]) -> bool:
    """Whether this jaxlib starts with ``flags`` (XLA aborts on a flag it does not know)."""
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    probe = "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()"
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True)
    return done.returncode == 0


def configure(config) -> None:
    """``FAST_COMPILE`` in ``XLA_FLAGS``, each flag this jaxlib accepts, unless set already or
    the run is on a GPU (``--device cuda``), where the level would apply to the generated
    kernels. Child processes (xdist workers, CLI runs) inherit the flags and skip the probe."""
    if "cuda" in str(config.getoption("--device", default="cpu")):
        return
    flags = os.environ.get("XLA_FLAGS", "").split()
    wanted = [f for f in FAST_COMPILE if not any(g.startswith(f.split("=")[0]) for g in flags)]
    if not wanted:
        return
    if not _accepted(flags + wanted):
        wanted = [f for f in wanted if _accepted([*flags, f])]
    os.environ["XLA_FLAGS"] = " ".join(flags + wanted)

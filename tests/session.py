"""Settings for a test session (``tests/`` and ``parity_tests/``), made before JAX starts."""

import os


def configure(config) -> None:
    """The suite runs tiny models on the CPU, where XLA spends most of its time compiling:
    LLVM's lowest optimisation level compiles about 30 % faster and computes the same IEEE
    results (XLA's CPU fast math stays off). Not for a GPU run (``--device cuda``), where
    the level would apply to the generated kernels."""
    if "cuda" in str(config.getoption("--device", default="cpu")):
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()

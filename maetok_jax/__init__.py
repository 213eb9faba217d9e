"""MAETok in JAX: the tokenizer as pure functions over parameter pytrees."""

import os


def enable_compilation_cache(path: str | None = None) -> None:
    """Keep compiled train steps on disk so a second run with the same config starts in seconds.

    Uses ``$MAETOK_JAX_CACHE`` or ``~/.cache/maetok/jax``; does nothing if a cache directory
    is already configured or ``MAETOK_JAX_CACHE=off``.
    """
    import jax

    path = path or os.environ.get("MAETOK_JAX_CACHE") or os.path.expanduser("~/.cache/maetok/jax")
    if path == "off" or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

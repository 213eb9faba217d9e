"""MAETok in PyTorch: the same functions, names and parameter tree as ``maetok_jax``."""

"""Patchify and unpatchify: the fixed reshapes inside P and P⁻¹ (docs/design.md §3.1, §3.4).

Tokens are numbered row-major over the (H/p)×(W/p) grid; each patch is flattened in
(row, column, channel) order, so a token vector is ``p·p·C`` long.
"""

import torch


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, H, W, C) → (B, N, p·p·C)."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // p, p, w // p, p, c)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, H/p, W/p, p, p, C)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, p: int, h: int, w: int, c: int) -> torch.Tensor:
    """(B, N, p·p·C) → (B, H, W, C), the inverse of ``patchify``."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h // p, w // p, p, p, c)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (B, H/p, p, W/p, p, C)
    return x.reshape(b, h, w, c)

"""The project's default data: procedurally drawn RGB images, a pure function of (seed, i).

``SyntheticImages`` is a dataset like ``maetok.data.ImageFolder`` (``len``, ``[i]`` → uint8
``(size, size, 3)``, ``name(i)``), so ``maetok.data.BatchSource`` crops, flips and masks it
the same way. Each image is a colour gradient with several shaded or textured shapes and
mild noise (``_render_synthetic``), with anti-aliased edges.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import numpy as np

from maetok.errors import ConfigError

_SYNTH_STREAM = 0x53594E  # "SYN": keeps synthetic content apart from the per-step streams
_SYNTH_CACHE_BYTES = 256 << 20


class SyntheticImages:
    """``count`` procedurally drawn RGB images of ``size``², the project's default data.

    Item ``i`` is a uint8 ``(size, size, 3)`` array determined by ``(seed, i)`` alone:
    a colour-gradient background with several shaded or textured shapes and mild noise
    (``_render_synthetic``). The ``cache_items`` most recently used items are kept (by
    default as many as fit in about 256 MB), so small images are drawn once and large ones
    stay cheap on memory. Returned arrays are read-only: the cache may share them.
    """

    def __init__(self, size: int, count: int = 4096, seed: int = 0, cache_items: int | None = None):
        if size < 8:
            raise ConfigError(f"synthetic images must be at least 8 pixels wide, got {size}")
        if count < 1:
            raise ConfigError(f"a synthetic dataset needs at least one image, got count={count}")
        self.size, self.count, self.seed = size, count, seed
        if cache_items is None:
            cache_items = min(count, _SYNTH_CACHE_BYTES // (size * size * 3))
        self.cache_items = max(1, cache_items)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # the Prefetcher reads from several threads

    def __len__(self) -> int:
        return self.count

    def name(self, i: int) -> str:
        return f"synthetic image {i}"

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.count:
            raise IndexError(f"synthetic image {i} out of range [0, {self.count})")
        with self._lock:
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
        image = _render_synthetic(self.size, np.random.default_rng([self.seed, i, _SYNTH_STREAM]))
        image.flags.writeable = False
        with self._lock:
            self._cache[i] = image
            if len(self._cache) > self.cache_items:
                self._cache.popitem(last=False)
        return image


def _render_synthetic(s: int, rng: np.random.Generator) -> np.ndarray:
    """One (s, s, 3) uint8 image: a colour gradient, 4–9 shapes on top, mild noise."""
    # Scalars stay Python floats (math, .tolist()): a NumPy float64 scalar would promote
    # the float32 arrays to float64 and double the cost.
    c = np.arange(s, dtype=np.float32) + 0.5  # pixel centres
    a = rng.uniform(0, 2 * math.pi)
    t = ((c[None, :] - s / 2) * math.cos(a) + (c[:, None] - s / 2) * math.sin(a)) / (1.42 * s) + 0.5
    c0, c1 = rng.uniform(0, 255, (2, 3, 1, 1)).astype(np.float32)
    # Drawn channel-first: numpy broadcasts over a trailing axis of 3 many times slower.
    img = c0 + t * (c1 - c0)  # (C, H, W), t in [0, 1] across the diagonal
    for _ in range(rng.integers(4, 10)):
        _draw_shape(img, s, rng)
    # Uniform noise from raw bytes (a Gaussian draw would cost as much as all the shapes),
    # centred, with the +0.5 that makes the final cast round to nearest; in place throughout.
    noise = np.frombuffer(rng.bytes(img.size), np.uint8).reshape(img.shape).astype(np.float32)
    k = rng.uniform(0.015, 0.05)
    noise *= k
    noise += 0.5 - 127.5 * k
    img += noise
    np.clip(img, 0, 255, out=img)
    return img.transpose(1, 2, 0).astype(np.uint8, order="C")  # (H, W, C)


def _draw_shape(img: np.ndarray, s: int, rng: np.random.Generator) -> None:
    """Blend one ellipse, rectangle, convex polygon or line into ``img`` in place.

    Each shape is a signed distance ``sdf`` (pixels, < 0 inside) evaluated on its bounding
    box only, which keeps a 256² image within a few milliseconds; ``0.5 - sdf`` clipped to
    [0, 1] is the pixel coverage, so edges are anti-aliased like a photographed edge.
    """
    cx, cy = rng.uniform(0, s, 2).tolist()
    r = rng.uniform(0.06, 0.3) * s  # every shape fits in a disc of radius r (+ line width)
    kind, phi = rng.integers(4), rng.uniform(0, 2 * math.pi)
    width = rng.uniform(0.5, 0.5 + 0.015 * s)  # lines only
    ext = r + width + 2
    y0, y1 = max(0, int(cy - ext)), min(s, int(cy + ext) + 1)
    x0, x1 = max(0, int(cx - ext)), min(s, int(cx + ext) + 1)
    if y0 >= y1 or x0 >= x1:
        return
    y = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy  # (h, 1), centred on the shape
    x = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx  # (1, w)
    cos, sin = math.cos(phi), math.sin(phi)
    u, v = x * cos + y * sin, y * cos - x * sin  # (h, w) coordinates in the shape's frame
    if kind == 0:  # ellipse; the distance is exact along the minor axis, close enough elsewhere
        rb = r * rng.uniform(0.4, 1.0)
        sdf = (np.sqrt((u / r) ** 2 + (v / rb) ** 2) - 1) * rb
    elif kind == 1:  # rectangle with half-sides up to r/√2, so its corners stay within r
        ha, hb = (r * rng.uniform(0.3, 0.707, 2)).tolist()
        sdf = np.maximum(np.abs(u) - ha, np.abs(v) - hb)
    elif kind == 2:  # convex polygon: the intersection of the half-planes of its edges
        k = rng.integers(3, 7)
        ang = phi + 2 * np.pi * (np.arange(k) + rng.uniform(-0.3, 0.3, k)) / k
        px, py = (r * rng.uniform(0.6, 1.0, k) * np.stack([np.cos(ang), np.sin(ang)])).tolist()
        sdf = np.full(u.shape, -np.inf, np.float32)
        for i in range(k):
            ex, ey = px[(i + 1) % k] - px[i], py[(i + 1) % k] - py[i]
            nx, ny = ey / math.hypot(ex, ey), -ex / math.hypot(ex, ey)
            if nx * px[i] + ny * py[i] < 0:  # point the normal away from the centre
                nx, ny = -nx, -ny
            sdf = np.maximum(sdf, nx * (x - px[i]) + ny * (y - py[i]))
    else:  # line segment of half-length up to r along u
        half = r * rng.uniform(0.5, 1.0)
        sdf = np.sqrt(np.maximum(np.abs(u) - half, 0) ** 2 + v**2) - width
    cover = np.clip(0.5 - sdf, 0, 1) * rng.uniform(0.6, 1.0)  # (h, w), translucent
    patch = img[:, y0:y1, x0:x1]  # (C, h, w) view: the blend writes into img
    patch += cover * (_fill(u, v, r, rng) - patch)


def _fill(u: np.ndarray, v: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    """(C, h, w) colours of a shape: linear shading, stripes, checkerboard or a sinusoid."""
    ca, cb = rng.uniform(0, 255, (2, 3, 1, 1)).astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:
        return ca + (u / r) * rng.uniform(-40, 40, (3, 1, 1)).astype(np.float32)
    period = rng.uniform(3.0, max(4.0, r))
    if kind == 1:
        tex = np.sin(2 * math.pi * u / period) > 0
    elif kind == 2:
        tex = (np.floor(u / period) + np.floor(v / period)) % 2
    else:
        tex = 0.5 + 0.5 * np.sin(2 * math.pi * u / period) * np.cos(2 * math.pi * v / period)
    return ca + tex.astype(np.float32) * (cb - ca)

"""Pictures of a run: reconstruction grids (PIL) and loss curves (matplotlib, Agg).

matplotlib is imported inside the plotting functions and drawn through its Agg canvas, so
importing maetok neither needs a display nor changes the backend a user has chosen.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from maetok.data import to_uint8
from maetok.errors import MAETokError

_GAP, _LABEL_WIDTH, _MIN_PIXELS = 4, 110, 128
# Metrics plotted besides every key starting with "loss"; "mask/hog" counts as "mask".
CURVE_KEYS = (
    "rec",
    "mask",
    "percep",
    "adv",
    "disc",
    "lecam",
    "lr",
    "grad_norm",
    "mask_ratio",
    "psnr",
    "ssim",
)


def _pixel_mask(masks, b: int, h: int, w: int, patch_size: int | None) -> np.ndarray:
    """(B, N) token mask → (B, H, W) bool, 1 = masked; p inferred from N if not given."""
    m = np.asarray(masks)[:b] > 0.5
    p = patch_size or round(math.sqrt(h * w / m.shape[1]))
    if (h // p) * (w // p) != m.shape[1] or h % p or w % p:
        raise ValueError(
            f"a mask of {m.shape[1]} tokens does not fit {h}×{w} images with patch size {p}"
        )
    m = m.reshape(b, h // p, w // p)
    return m.repeat(p, axis=1).repeat(p, axis=2)


def save_grid(
    path, originals, reconstructions, masks=None, patch_size: int | None = None, max_images: int = 8
) -> Path:
    """One PNG comparing the first ``max_images`` images, a column per image.

    Rows: the originals (B, H, W, C) in [-1, 1]; if ``masks`` (B, N) is given, the masked
    encoder input with masked patches in flat grey; the reconstructions (B, H, W, C).
    Small images are enlarged by an integer factor (nearest neighbour) to at least 128 px.
    """
    orig = to_uint8(np.asarray(originals)[:max_images])
    rec = to_uint8(np.asarray(reconstructions)[:max_images])
    if orig.shape != rec.shape:
        raise ValueError(f"originals {orig.shape} and reconstructions {rec.shape} differ in shape")
    b, h, w, _ = orig.shape
    rows = [("original", orig)]
    if masks is not None:
        hidden = _pixel_mask(masks, b, h, w, patch_size)[..., None]  # (B, H, W, 1)
        rows.append(("masked input", np.where(hidden, np.uint8(128), orig)))
    rows.append(("reconstruction", rec))

    return _save_rows(path, rows)


def save_class_grid(path, images, labels, class_names, per_class: int = 10) -> Path:
    """One PNG with a row per class: up to ``per_class`` of its images, named on the left.

    ``images`` (B, H, W, C) uint8 and ``labels`` (B,) ints indexing ``class_names``; a
    class with no image gets an empty row, so rows always line up with the class list.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or len(images) != len(labels):
        raise ValueError(
            f"expected uint8 images and one label each, got {images.dtype} "
            f"{images.shape} and labels {labels.shape}"
        )
    rows = [(name, images[labels == c][:per_class]) for c, name in enumerate(class_names)]
    return _save_rows(path, rows)


def _save_rows(path, rows: list[tuple[str, np.ndarray]]) -> Path:
    """Draw labelled rows of uint8 images (n, H, W, C), enlarged to at least 128 px."""
    if not any(len(images) for _, images in rows):
        raise ValueError("no images to draw")
    h, w = next(images.shape[1:3] for _, images in rows if len(images))
    b = max(len(images) for _, images in rows)
    scale = max(1, math.ceil(_MIN_PIXELS / max(h, w)))
    ch, cw = h * scale, w * scale
    canvas = Image.new(
        "RGB", (_LABEL_WIDTH + b * (cw + _GAP), len(rows) * (ch + _GAP) + _GAP), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        top = _GAP + r * (ch + _GAP)
        draw.text((6, top + ch // 2 - 6), label, fill="black")
        for i, image in enumerate(images):
            if image.shape[-1] == 1:
                image = image.repeat(3, axis=-1)
            big = image.repeat(scale, axis=0).repeat(scale, axis=1)
            canvas.paste(Image.fromarray(big), (_LABEL_WIDTH + i * (cw + _GAP), top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _wanted(key: str) -> bool:
    return key.startswith("loss") or key.split("/")[0] in CURVE_KEYS


def read_curves(metrics_jsonl) -> dict[str, tuple[list[int], list[float]]]:
    """Key → (steps, values) of the finite numeric entries of a metrics.jsonl.

    Lines that are not JSON objects with a numeric "step" are skipped, so a file cut short
    by a crash still plots.
    """
    path = Path(metrics_jsonl)
    if not path.is_file():
        raise MAETokError(
            f"metrics file {path} does not exist; it is written by training into the run folder"
        )
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not _is_number(record.get("step")):
            continue
        for key, value in record.items():
            if key != "step" and _wanted(key) and _is_number(value) and math.isfinite(value):
                steps, values = curves.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(float(value))
    return curves


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_curves(metrics_jsonl, out_png) -> list[str]:
    """Plot every loss-like metric of a metrics.jsonl against step; returns the keys plotted.

    One subplot per key, on a log scale when all its values are positive (a generator
    hinge term or an annealed mask ratio can reach zero or below, and stays linear).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = read_curves(metrics_jsonl)
    if not curves:
        raise MAETokError(
            f"{metrics_jsonl} holds no plottable metrics (keys starting with "
            f"'loss' or one of {', '.join(CURVE_KEYS)}, each with a 'step')"
        )
    keys = sorted(curves, key=lambda k: (not k.startswith("loss"), k))
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows))
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys):
        steps, values = curves[key]
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.plot(steps, values, linewidth=1)
        if min(values) > 0:
            ax.set_yscale("log")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(True, which="both", alpha=0.3)
    _save(fig, out_png)
    return keys


def _save(fig, out_png) -> Path:
    """Lay out ``fig`` and write it to ``out_png`` (its folder made), at 100 dpi."""
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def line_style(j: int) -> dict:
    """The ``j``-th line's colour and dash: ten colours, then the same ten dashed, then
    dotted, so that no two of a panel's first thirty lines look alike."""
    return {"color": f"C{j % 10}", "linestyle": ("-", "--", ":")[j // 10 % 3]}


def plot_overlay(panels: list[tuple[str, dict]], out_png, ylabel: str = "") -> Path:
    """Several runs' curves side by side: ``panels`` is a list of ``(title, {label: (steps,
    values)})``, one subplot each with a line per label (a log scale where every value is
    positive; past ten lines the colours repeat dashed). Values of None are left out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not panels:
        raise MAETokError("nothing to plot: no curves given")
    fig = Figure(figsize=(6.5 * len(panels), 4.2))
    FigureCanvasAgg(fig)
    for i, (title, lines) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        positive = True
        for j, (label, (steps, values)) in enumerate(lines.items()):
            kept = [(s, v) for s, v in zip(steps, values) if v is not None and math.isfinite(v)]
            if kept:
                ax.plot(*zip(*kept), linewidth=1.2, label=label, **line_style(j))
                positive = positive and min(v for _, v in kept) > 0
        if positive:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out_png)

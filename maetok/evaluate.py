"""``maetok eval``: reconstruction quality on a folder, against an equal-size thumbnail.

For each centre crop it reports PSNR and SSIM of the tokenizer's reconstruction (no mask)
and of a *thumbnail baseline*: the image shrunk to a thumbnail that holds as many numbers
as the latent tokens (L·latent_dim ≈ side²·C) and enlarged back with bicubic resampling.
A tokenizer that does not beat its thumbnail is not working. It also reports latent
statistics, with the fraction of latent dimensions whose variance is negligible as a
collapse indicator, and writes a PNG sheet: originals, reconstructions, |error| maps.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from maetok.data import from_uint8, load_eval_images, to_uint8
from maetok.metrics import psnr, ssim

COLLAPSE_REL_VAR = 1e-3  # a latent dim with variance below this × the median dim's is "dead"
SHEET_NAME = "eval_sheet.png"  # the picture sheet written beside eval.json


def thumbnail_side(m) -> int:
    """Side of the square RGB thumbnail holding as many values as L·latent_dim."""
    return max(1, round(math.sqrt(m.num_latent_tokens * m.latent_dim / m.channels)))


def thumbnail_baseline(images: np.ndarray, side: int) -> np.ndarray:
    """(B, H, W, C) in [-1, 1] → the same images through a side×side bicubic thumbnail."""
    out = []
    for img in to_uint8(images):
        h, w = img.shape[:2]
        small = Image.fromarray(img).resize((side, side), Image.BICUBIC, reducing_gap=None)
        out.append(np.asarray(small.resize((w, h), Image.BICUBIC), np.float32))
    return np.stack(out) / 127.5 - 1.0


def latent_stats(latents: np.ndarray) -> dict:
    """latents (B, L, d) → mean/std overall, per-token std spread, dead-dimension fraction."""
    flat = latents.reshape(-1, latents.shape[-1])  # (B·L, d)
    var = flat.var(axis=0)
    ref = max(float(np.median(var)), 1e-12)
    per_token_std = latents.std(axis=(0, 2))  # (L,)
    return {
        "mean": float(latents.mean()),
        "std": float(latents.std()),
        "per_token_std_min": float(per_token_std.min()),
        "per_token_std_max": float(per_token_std.max()),
        "dead_dim_fraction": float(np.mean(var < COLLAPSE_REL_VAR * ref)),
    }


def save_sheet(path, images, recons, names, psnrs, ssims, max_images: int = 8, scale: int = 1):
    """Rows: original / reconstruction / |error| (amplified ×4), one column per image."""
    n = min(max_images, len(images))
    h, w = images.shape[1:3]
    cell_w, cell_h, label_h = w * scale, h * scale, 14
    sheet = Image.new("RGB", (n * cell_w, 3 * (cell_h + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    err = np.clip(np.abs(recons - images).mean(-1) * 4.0, 0, 2) - 1.0  # 4× amplified, mono
    rows = [
        to_uint8(images[:n]),
        to_uint8(recons[:n]),
        np.repeat(to_uint8(err[:n, ..., None]), 3, axis=-1),
    ]
    titles = ["original", "reconstruction", "|error| x4"]
    for r, (row, title) in enumerate(zip(rows, titles)):
        y = r * (cell_h + label_h)
        for i in range(n):
            tile = Image.fromarray(row[i]).resize((cell_w, cell_h), Image.NEAREST)
            sheet.paste(tile, (i * cell_w, y + label_h))
            text = (
                Path(names[i]).stem[:14]
                if r == 0
                else f"{psnrs[i]:.2f} dB  {ssims[i]:.3f}"
                if r == 1
                else title
            )
            draw.text((i * cell_w + 2, y + 1), text, fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def psnr_by_mask_ratio(
    backend, params, images, ratios, batch_size: int = 16, seed: int = 0
) -> dict[str, float]:
    """Mean PSNR of reconstructions from inputs with a fraction ``r`` of tokens masked.

    A Stage-1 encoder only ever sees 40–60 % of its tokens replaced by the mask token; how
    its reconstructions change as ``r`` goes to 0 shows how much it leans on them. Masks are
    Bernoulli(r) per token, seeded, the same for every checkpoint.
    """
    # unclipped, as the main row of the report
    return {
        f"{r:g}": float(
            psnr(images, reconstruct_all(backend, params, images, batch_size, r, seed)).mean()
        )
        for r in ratios
    }


def reconstruct_all(
    backend, params, images, batch_size: int = 16, ratio: float = 0.0, seed: int = 0
) -> np.ndarray:
    """Reconstructions of ``images`` (B, H, W, C) in batches, a fraction ``ratio`` masked."""
    from maetok.masks import sample_mask

    n, recons = backend.cfg.model.num_patches, []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        mask = sample_mask(seed, i, len(chunk), n, ratio) if ratio > 0 else None
        recons.append(backend.reconstruct(params, chunk, mask))
    return np.concatenate(recons)


def encode_all(backend, params, images, batch_size: int = 16) -> np.ndarray:
    """Latents (B, L, h) of ``images`` (B, H, W, C) in batches; uint8 images are scaled to
    [-1, 1] one batch at a time, so a large uint8 set is never held as float32 whole."""
    chunks = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
    return np.concatenate(
        [backend.encode(params, from_uint8(c) if c.dtype == np.uint8 else c) for c in chunks]
    )


@dataclass(frozen=True)
class EvalSet:
    """The centre crops of a folder and the thumbnail baseline's scores on them: what every
    report on that folder shares, for tokenizers of one image size and thumbnail side."""

    folder: str
    images: np.ndarray  # (B, size, size, 3) in [-1, 1]
    names: list[str]
    side: int  # of the thumbnail
    thumb_psnr: np.ndarray  # per image
    thumb_ssim: np.ndarray

    @classmethod
    def load(cls, folder, m, skip_broken: bool = False) -> EvalSet:
        images, names = load_eval_images(folder, m.image_size, skip_broken)
        side = thumbnail_side(m)
        thumb = thumbnail_baseline(images, side)
        return cls(str(folder), images, names, side, psnr(images, thumb), ssim(images, thumb))

    def fits(self, folder, m) -> bool:
        """Whether this is ``folder``'s set for a tokenizer of model config ``m``."""
        same = self.images.shape[1] == m.image_size and self.side == thumbnail_side(m)
        return same and self.folder == str(folder)


def evaluate(
    cfg,
    backend,
    params,
    folder,
    out_dir=None,
    batch_size: int = 16,
    mask_ratios: tuple[float, ...] = (),
    skip_broken: bool = False,
    reference: EvalSet | None = None,
) -> dict:
    """Evaluate ``params`` on centre crops of ``folder``; print and write a report.
    ``reference``: the folder's crops and thumbnail scores, loaded once for several reports."""
    m = cfg.model
    if reference is None or not reference.fits(folder, m):
        reference = EvalSet.load(folder, m, skip_broken)
    images, names, side = reference.images, reference.names, reference.side
    recon = reconstruct_all(backend, params, images, batch_size)
    latents = encode_all(backend, params, images, batch_size)
    p_model, s_model = psnr(images, recon), ssim(images, recon)
    p_thumb, s_thumb = reference.thumb_psnr, reference.thumb_ssim
    report = {
        "images": len(images),
        "folder": str(folder),
        "tokenizer": {"psnr": float(p_model.mean()), "ssim": float(s_model.mean())},
        "thumbnail": {
            "side": side,
            "values": side * side * m.channels,
            "psnr": float(p_thumb.mean()),
            "ssim": float(s_thumb.mean()),
        },
        "latent_values": m.num_latent_tokens * m.latent_dim,
        "latents": latent_stats(latents),
        "per_image": [
            {
                "name": n,
                "psnr": float(a),
                "ssim": float(b),
                "thumb_psnr": float(c),
                "thumb_ssim": float(d),
            }
            for n, a, b, c, d in zip(names, p_model, s_model, p_thumb, s_thumb)
        ],
    }
    print(f"{'':24s}{'PSNR (dB)':>10s}{'SSIM':>8s}")
    print(f"{'tokenizer':24s}{report['tokenizer']['psnr']:10.2f}{report['tokenizer']['ssim']:8.3f}")
    print(
        f"{f'thumbnail {side}x{side} bicubic':24s}{report['thumbnail']['psnr']:10.2f}"
        f"{report['thumbnail']['ssim']:8.3f}"
    )
    if mask_ratios:
        report["psnr_by_mask_ratio"] = psnr_by_mask_ratio(
            backend, params, images, mask_ratios, batch_size
        )
        print(
            "PSNR by input mask ratio: "
            + ", ".join(f"r={r} {v:.2f} dB" for r, v in report["psnr_by_mask_ratio"].items())
        )
    st = report["latents"]
    print(
        f"latents: mean {st['mean']:.3f} std {st['std']:.3f}, per-token std "
        f"{st['per_token_std_min']:.3f}–{st['per_token_std_max']:.3f}, "
        f"dead dims {100 * st['dead_dim_fraction']:.1f}%"
    )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(report, indent=2))
        save_sheet(
            out / SHEET_NAME,
            images,
            recon,
            names,
            p_model,
            s_model,
            scale=max(1, 128 // m.image_size),
        )
        print(f"maetok: wrote {out / 'eval.json'} and {out / SHEET_NAME}")
    return report


def evaluate_checkpoints(
    jobs: list[tuple[Path, bool, Path]],
    folder,
    backend_name: str = "jax",
    device: str | None = None,
    batch_size: int = 16,
) -> list[dict]:
    """``maetok eval`` of several ``(checkpoint, use_ema, out_dir)`` in one process: the
    folder's crops and thumbnail scores are computed once, and checkpoints of one model
    share a backend, so its programs compile once. Each report is the one ``maetok eval``
    writes for that checkpoint alone."""
    from maetok.pretrained import load_params
    from maetok.trainer import get_backend

    backend, reference, reports = None, None, []
    for checkpoint, use_ema, out_dir in jobs:
        cfg, params = load_params(checkpoint, use_ema=use_ema)
        if backend is None or backend.cfg.model != cfg.model:
            backend = get_backend(backend_name)(cfg, device)
        if reference is None or not reference.fits(folder, cfg.model):
            reference = EvalSet.load(folder, cfg.model)
        print(f"maetok: evaluating {checkpoint}{' (EMA weights)' if use_ema else ''}", flush=True)
        params = backend.to_device_tree(params)
        reports.append(
            evaluate(cfg, backend, params, folder, out_dir, batch_size, reference=reference)
        )
    return reports

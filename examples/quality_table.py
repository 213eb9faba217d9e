"""Collect the ``eval.json`` reports of a BSDS500 recipe run into one Markdown table.

    python examples/quality_table.py runs/bsds500

One row per recipe variant whose report exists.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROWS = [  # (label, report path under the run folder)
    ("MAETok Stage 1 + Stage 2", "full/stage2/eval/eval.json"),
    ("(a) Stage 1 only", "full/stage1/eval/eval.json"),
    ("(b) plain autoencoder (r = 0, no aux)", "plain_ae/stage1/eval/eval.json"),
    ("(c) with adversarial loss, Stage 1 + 2", "gan/stage2/eval/eval.json"),
    ("tuned: r ~ U[0, 0.6], γ = 0.1, Stage 1 + 2", "tuned/stage2/eval/eval.json"),
]


def main(root: str) -> int:
    root_path = Path(root)
    reports = [
        (label, json.loads((root_path / rel).read_text()))
        for label, rel in ROWS
        if (root_path / rel).is_file()
    ]
    if not reports:
        print(f"no eval.json under {root_path}")
        return 1
    thumb = reports[0][1]["thumbnail"]
    n = reports[0][1]["images"]
    print(f"BSDS500 val, {n} centre crops; latent budget {reports[0][1]['latent_values']} values\n")
    # PSNR with a fraction of the input tokens masked (`maetok eval --mask-ratios`), if reported
    ratios = sorted({k for _, r in reports for k in r.get("psnr_by_mask_ratio", {})}, key=float)
    extra = "".join(f" PSNR at r = {k} |" for k in ratios)
    print(f"| model | PSNR (dB) | SSIM |{extra} latent std | dead latent dims |")
    print("|---|---|---|" + "---|" * len(ratios) + "---|---|")
    print(
        f"| thumbnail {thumb['side']}×{thumb['side']} bicubic ({thumb['values']} values) "
        f"| {thumb['psnr']:.2f} | {thumb['ssim']:.3f} |" + " – |" * len(ratios) + " – | – |"
    )
    for label, r in reports:
        st, by_r = r["latents"], r.get("psnr_by_mask_ratio", {})
        cells = "".join(f" {by_r[k]:.2f} |" if k in by_r else " – |" for k in ratios)
        print(
            f"| {label} | {r['tokenizer']['psnr']:.2f} | {r['tokenizer']['ssim']:.3f} |{cells}"
            f" {st['std']:.3f} | {100 * st['dead_dim_fraction']:.1f}% |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/bsds500"))

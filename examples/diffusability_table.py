"""The diffusability table of a finished `examples/cifar10_diffusability.sh` run.

    python examples/diffusability_table.py runs/c10 [--guidance 1.5] [--figure docs/x.png]
    python examples/diffusability_table.py runs/c10 runs/c10_recipe   # two studies, one table

With several study folders (e.g. the same study at another masking), each row names its
folder.

One row per tokenizer: its reconstruction PSNR on the CIFAR-10 test set, the linear probe
on its latents, the held-out GMM negative log-likelihood of its normalised latents at a few
component counts, and, for the diffusion models trained on it (one per seed), FD-C10
without and with guidance, precision, recall and class consistency. Sample metrics are
given as mean ± half the range over the seeds (with two seeds: the two values are
mean − x and mean + x). ``--figure`` puts the guided sample grids of the first seed side by
side, one panel per tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

TOKENIZERS = (
    ("plain_ae", "plain AE"),
    ("maetok_s1", "MAETok Stage 1"),
    ("maetok_s2", "MAETok Stage 1 + 2"),
)
GMM_COMPONENTS = ("1", "4", "16")


def _spread(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    mean, half = float(np.mean(values)), (max(values) - min(values)) / 2
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def _runs(out: Path, name: str) -> list[Path]:
    return sorted((out / "diffusion").glob(f"{name}_seed*"))


def _sample_values(runs: list[Path], guidance: str, key: str) -> list[float]:
    values = []
    for run in runs:
        path = run / f"eval_g{guidance}.json"
        if path.exists():
            values.append(float(json.loads(path.read_text())["samples"][key]))
    return values


def table(folders: list[Path], guidance: str) -> str:
    head = (
        ["tokenizer", "rPSNR (dB)", "linear probe"]
        + [f"GMM NLL K={k}" for k in GMM_COMPONENTS]
        + [
            "FD-C10 (g=1)",
            f"FD-C10 (g={guidance})",
            "precision",
            "recall",
            "class consistency",
            "seeds",
        ]
    )
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for folder, (name, title) in ((f, t) for f in folders for t in TOKENIZERS):
        path = folder / "tokenizers" / name / "metrics.json"
        if not path.exists():
            continue
        (tok,) = json.loads(path.read_text())["tokenizers"].values()
        runs = _runs(folder, name)
        label = f"{folder.name}: {title}" if len(folders) > 1 else title
        cells = [label, f"{tok['psnr']:.2f}", f"{100 * tok['linear_probe']:.1f} %"]
        cells += [
            f"{tok['gmm_nll'][k]:.3f}" if k in tok["gmm_nll"] else "–" for k in GMM_COMPONENTS
        ]
        cells += [
            _spread(_sample_values(runs, "1.0", "fd_c10"), 2),
            _spread(_sample_values(runs, guidance, "fd_c10"), 2),
        ]
        cells += [
            _spread(_sample_values(runs, guidance, key), 3)
            for key in ("precision", "recall", "class_consistency")
        ]
        cells.append(str(len(runs)))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def figure(out: Path, guidance: str, dest: Path) -> Path:
    from PIL import Image, ImageDraw

    panels = []
    for name, title in TOKENIZERS:
        runs = _runs(out, name)
        grid = runs[0] / f"grid_g{guidance}.png" if runs else None
        if grid is None or not grid.exists():
            continue
        im = Image.open(grid).convert("RGB")
        canvas = Image.new("RGB", (im.width, im.height + 18), "white")
        canvas.paste(im, (0, 18))
        ImageDraw.Draw(canvas).text((4, 3), f"{title}, g={guidance}", fill="black")
        panels.append(canvas)
    if not panels:
        raise SystemExit(f"no sample grids (grid_g{guidance}.png) under {out / 'diffusion'}")
    gap = 12
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    sheet = Image.new("RGB", (width, max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        sheet.paste(p, (x, 0))
        x += p.width + gap
    dest.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(dest)
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, nargs="+", help="the study's OUT folder (or several)")
    ap.add_argument("--guidance", default="1.5", help="the guided scale the study sampled at")
    ap.add_argument("--figure", type=Path, help="write the side-by-side sample grids here")
    args = ap.parse_args(argv)
    for out in args.out:
        if not (out / "tokenizers").is_dir():
            print(
                f"diffusability_table: error: {out} holds no study (no tokenizers/ folder)",
                file=sys.stderr,
            )
            return 2
    print(table(args.out, args.guidance))
    if args.figure:  # the first study's sample grids
        print(f"\nsample grids: {figure(args.out[0], args.guidance, args.figure)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

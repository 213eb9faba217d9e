"""``recipe.py study`` and ``recipe.py table``: the recipe's runs side by side on one GPU (the
three seeds, a repeat for the determinism check, each lever of ``recipe.LEVERS`` at a share of
the budget), and the Markdown tables of a folder of runs: the seed table (mean ± spread), the
lever table (Δ PSNR against the recipe at the same budget) and the determinism check (the
tensor digests of a run and its repeat).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from examples import recipe
from examples.recipe import LEVER_SHARE, LEVERS, RECIPE, error


def lever_steps(steps: int, share: float = LEVER_SHARE) -> int:
    """The steps of each lever run (and of the recipe they are measured against)."""
    return max(2, round(steps * share))


def jobs(
    steps: int, seeds=(0, 1, 2), levers: int | None = None, lever_share: float = LEVER_SHARE
) -> list[dict]:
    """Every run of the study: name, variant, seed, steps and changes (the first ``levers``
    levers only, if given; each at ``lever_share`` of ``steps``)."""
    out = []
    for seed in seeds:
        out.append(dict(name=f"maetok_s{seed}", variant="maetok", seed=seed, steps=steps))
        out.append(dict(name=f"plain_s{seed}", variant="plain", seed=seed, steps=steps))
    # the determinism check: the first seed again, compiled afresh (no shared compilation
    # cache, so its kernels are chosen, and autotuned, on their own)
    out.append(
        dict(
            name=f"maetok_s{seeds[0]}_repeat",
            variant="maetok",
            seed=seeds[0],
            steps=steps,
            env={"MAETOK_JAX_CACHE": "off"},
        )
    )
    if levers == 0:  # the seeds and the determinism check only
        return out
    # a lever run reports what the lever table reads: Stage 2's EMA weights (and the raw
    # weights of the recipe's own run, the EMA lever)
    part = lever_steps(steps, lever_share)
    lever = dict(variant="maetok", seed=0, steps=part, evals=["stage2/eval"])
    out.append({**lever, "name": "lever_recipe", "evals": ["stage2/eval", "stage2/eval_raw"]})
    for i, (name, change) in enumerate(list(LEVERS.items())[:levers]):
        out.append({**lever, "name": f"lever_{i}", "lever": name, "changes": change})
    return out


def selected(steps: int, args) -> list[dict]:
    """The study's jobs for ``args`` (``--seeds``, ``--levers``, ``--lever-share``), only
    those ``--only`` names if given; an unknown name stops with one line."""
    every = jobs(steps, args.seeds, args.levers, args.lever_share)
    if not args.only:
        return every
    names = [j["name"] for j in every]
    unknown = [n for n in args.only if n not in names]
    if unknown:
        error(f"--only: no job {', '.join(unknown)} in this study; its jobs: {', '.join(names)}")
    return [j for j in every if j["name"] in args.only]


def _launch(job: dict, folder: Path, args, steps_only: int | None = None):
    """Start one job as a child process of this script's ``run`` command."""
    cmd = [sys.executable, recipe.__file__, "run", str(folder / job["name"])]
    cmd += ["--variant", job["variant"]]
    cmd += ["--seed", str(job["seed"]), "--steps", str(steps_only or job["steps"])]
    cmd += ["--data", str(args.data), "--preset", args.preset, "--train", str(args.train)]
    if job.get("changes"):
        cmd += ["--changes", json.dumps(job["changes"])]
    if job.get("evals"):
        cmd += ["--evals", ",".join(job["evals"])]
    if steps_only:
        cmd += ["--stage1-only"]
    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / f"{job['name']}.out", "a")  # noqa: SIM115 - closed by _wait
    env = {**os.environ, **job.get("env", {})}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log


def _pool(todo: list[dict], folder: Path, args, what: str, steps_only: int | None = None):
    """Run ``todo`` with at most ``args.jobs`` side by side (they share the GPU's memory)."""
    from tqdm import tqdm

    queue, running = list(todo), []
    with tqdm(total=len(todo), desc=what, unit="run", dynamic_ncols=True) as bar:
        while queue or running:
            while queue and len(running) < args.jobs:
                job = queue.pop(0)
                running.append((*_launch(job, folder, args, steps_only), job["name"]))
            for item in list(running):
                proc, log, name = item
                if proc.poll() is not None:
                    log.close()
                    running.remove(item)
                    bar.update(1)
                    if proc.returncode:
                        print(f"recipe: {name} failed (exit {proc.returncode}); see its .out")
            time.sleep(2)


def probe(folder: Path, args, probe_steps: int, budget_s: float) -> int:
    """Run the first stage of every job for ``probe_steps`` steps at once and measure the
    GPU's total images/s under that load; return the largest step count (a multiple of
    100) whose study fits in ``budget_s`` seconds at 90 % of that throughput.

    The model is work over throughput: the study's images (full runs ``steps``, lever runs
    half) over the summed images/s of the runs side by side. It is conservative, as the
    Stage-2 and plain-autoencoder steps cost less than the Stage-1 steps probed.
    """
    every = selected(100, args)
    todo = every[: args.jobs]  # as many as run side by side
    _pool(todo, folder / "probe", args, "probe", probe_steps)
    rates = {}
    for job in todo:
        rate = _images_per_s(folder / "probe" / job["name"] / "stage1/metrics.jsonl", last=3)
        if rate is None:
            error(f"the probe of {job['name']} logged nothing")
        rates[job["name"]] = rate
    total = sum(rates.values())
    images_per_step = RECIPE["train.batch_size"] * sum(j["steps"] for j in every) / 100
    steps = int(0.9 * total * budget_s / images_per_step) // 100 * 100
    print(
        f"recipe: {len(todo)} runs side by side, {total:.0f} images/s in all "
        f"({min(rates.values()):.0f}–{max(rates.values()):.0f} each) → {steps} steps"
    )
    (folder / "probe.json").write_text(json.dumps({"images_per_s": rates, "steps": steps}))
    return max(steps, 100)


def study(folder: Path, args) -> None:
    steps = args.steps
    if args.budget_min:
        steps = probe(folder, args, args.probe_steps, args.budget_min * 60)
    _pool(selected(steps, args), folder, args, "study")
    print(table(folder))


# ------------------------------------------------------------------------------ the tables


def _report(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _images_per_s(metrics: Path, last: int | None = None) -> float | None:
    """The median images/s over a run's logged steps (its ``last`` ones only, if given).
    Each step's line carries its logging interval's rate, so the median of a whole run
    leaves out the first interval's, which includes compiling; None before two lines."""
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    if len(lines) < 2:
        return None
    rates = [json.loads(line)["images_per_s"] for line in lines[-last if last else 0 :]]
    return statistics.median(rates)


def _run_steps(run: Path) -> int | None:
    """The steps a run trained, summed over its stages (from each ``metrics.jsonl``)."""
    done = [
        recipe.logged_steps(m) for m in sorted(run.glob("stage*/metrics.jsonl")) if m.stat().st_size
    ]
    return sum(done) or None


def _mean_spread(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _digests(run: Path) -> dict[str, str]:
    """Stage → the tensor digest ``maetok train`` printed when the stage finished."""
    log = run / "recipe.log"
    text = log.read_text() if log.is_file() else ""
    pattern = r"/(stage\d)/checkpoint\.safetensors \(tensors sha256 ([0-9a-f]+)\)"
    return dict(re.findall(pattern, text))


def _logged_agreement(first: Path, again: Path) -> str:
    """How many logged steps of two runs of one stage agree in every logged value but the
    rate (losses, gradient norm, mask ratio, learning rate), and the first that does not."""
    files = [s / "metrics.jsonl" for s in (first, again)]
    runs = [f.read_text().splitlines() if f.is_file() else [] for f in files]
    if not all(runs):
        return ""
    a, b = (
        [{k: v for k, v in json.loads(x).items() if k != "images_per_s"} for x in r] for r in runs
    )
    equal = sum(x == y for x, y in zip(a, b))
    text = f"; {equal:,} of {max(len(a), len(b)):,} logged steps equal"
    differ = next((x["step"] for x, y in zip(a, b) if x != y), None)
    return text + (f" (the first difference at step {differ})" if differ is not None else "")


def _run_table(folder: Path) -> list[str]:
    """Per full run (``maetok_s*``, ``plain_s*``, their repeats): each stage's median
    images/s, the tensor digests ``maetok train`` printed, and the last stage's EMA report."""
    runs = sorted(p for p in folder.glob("*_s[0-9]*") if p.is_dir())
    if not runs:
        return []
    lines = [
        "| run | images/s, Stage 1 | images/s, Stage 2 | tensors sha256 (per stage) "
        "| last stage, EMA weights |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        rates = [_images_per_s(run / f"stage{s}/metrics.jsonl") for s in (1, 2)]
        digests = _digests(run)
        last = sorted(run.glob("stage*/eval/eval.json"))
        report = _report(last[-1]) if last else None
        ema = (
            f"{report['tokenizer']['psnr']:.2f} dB / {report['tokenizer']['ssim']:.3f}"
            if report
            else "–"
        )
        lines.append(
            f"| {run.name} | {' | '.join(f'{r:,.0f}' if r else '–' for r in rates)} "
            f"| {' / '.join(digests[s] for s in sorted(digests)) or '–'} | {ema} |"
        )
    return [*lines, ""]


def table(folder: Path) -> str:
    """The seed table, the runs' rates and digests, the lever table and the determinism
    check of a study folder."""
    full = sorted(folder.glob("maetok_s[0-9]*"))
    steps = _run_steps(full[0]) if full else None
    lines = [f"Study in {folder}: {steps or '?'} steps per full run.\n"]
    rows = [
        ("MAETok Stage 1", "maetok_s{}", "stage1"),
        ("MAETok Stage 1 + Stage 2", "maetok_s{}", "stage2"),
        ("plain autoencoder", "plain_s{}", "stage1"),
    ]
    lines.append(
        "| model (BSDS500 val) | seeds | PSNR (dB) | SSIM | PSNR, EMA weights | "
        "SSIM, EMA weights | beats the thumbnail on |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    thumb = None
    for label, pattern, stage in rows:
        runs = [folder / pattern.format(seed) / stage for seed in (0, 1, 2)]
        raw = [r for run in runs if (r := _report(run / "eval_raw/eval.json"))]
        ema = [r for run in runs if (r := _report(run / "eval/eval.json"))]
        if not raw and not ema:
            continue
        thumb = (raw or ema)[0]["thumbnail"]
        cells = []
        for reports in (raw, ema):
            cells.append(_mean_spread([r["tokenizer"]["psnr"] for r in reports], 2))
            cells.append(_mean_spread([r["tokenizer"]["ssim"] for r in reports], 3))
        wins = [
            f"{sum(i['psnr'] > i['thumb_psnr'] for i in r['per_image'])}/{r['images']}" for r in raw
        ]
        lines.append(
            f"| {label} | {len(raw or ema)} | {' | '.join(cells)} | {', '.join(wins) or '–'} |"
        )
    if thumb:
        lines.append(
            f"| thumbnail {thumb['side']}×{thumb['side']} bicubic | – | {thumb['psnr']:.2f} "
            f"| {thumb['ssim']:.3f} | – | – | – |"
        )
    lines.append("\n(± is the standard deviation over the seeds.)\n")
    lines += _run_table(folder)

    ref = _report(folder / "lever_recipe/stage2/eval/eval.json")
    if ref:
        ref_psnr = ref["tokenizer"]["psnr"]
        part = _run_steps(folder / "lever_recipe")
        lines.append(f"Levers at {part} steps, seed 0, one change each:\n")
        lines.append("| change from the recipe | PSNR (dB) | Δ PSNR | SSIM | images/s (Stage 1) |")
        lines.append("|---|---|---|---|---|")
        rate = _images_per_s(folder / "lever_recipe/stage1/metrics.jsonl")
        lines.append(
            f"| none (the recipe) | {ref_psnr:.2f} | – | {ref['tokenizer']['ssim']:.3f} "
            f"| {rate or 0:.0f} |"
        )
        raw = _report(folder / "lever_recipe/stage2/eval_raw/eval.json")
        if raw:
            p = raw["tokenizer"]["psnr"]
            lines.append(
                f"| raw weights instead of EMA (same run) | {p:.2f} | {p - ref_psnr:+.2f} "
                f"| {raw['tokenizer']['ssim']:.3f} | – |"
            )
        for i, lever in enumerate(LEVERS):
            if not (folder / f"lever_{i}").is_dir():
                continue  # not in this study
            r = _report(folder / f"lever_{i}/stage2/eval/eval.json")
            if r is None:
                lines.append(f"| {lever} | (did not finish) | | | |")
                continue
            p = r["tokenizer"]["psnr"]
            rate = _images_per_s(folder / f"lever_{i}/stage1/metrics.jsonl")
            lines.append(
                f"| {lever} | {p:.2f} | {p - ref_psnr:+.2f} | {r['tokenizer']['ssim']:.3f} "
                f"| {rate or 0:.0f} |"
            )
    lines.append("\nDeterminism (tensor sha256 of the same command run twice):\n")
    repeats = sorted(folder.glob("*_repeat"))
    if not repeats:
        lines.append("- no repeat in this folder (a run NAME_repeat of NAME's command)")
    for repeat in repeats:
        source = folder / repeat.name.removesuffix("_repeat")
        first, again = _digests(source), _digests(repeat)
        for stage in sorted(first.keys() & again.keys()):
            same = "identical" if first[stage] == again[stage] else "DIFFERENT"
            logged = _logged_agreement(source / stage, repeat / stage)
            lines.append(
                f"- {repeat.name}, {stage}: {first[stage]} and {again[stage]}: {same}{logged}"
            )
    text = "\n".join(lines)
    (folder / "tables.md").write_text(text + "\n")
    return text

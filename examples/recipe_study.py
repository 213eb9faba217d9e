"""``recipe.py study``, ``record`` and ``table``: the recipe's runs side by side on one GPU (the
three seeds, a repeat for the determinism check, each lever of ``recipe.LEVERS`` at a share of
the budget); a run's record (the few tens of kB the tables read, kept where its folder of
checkpoints and logs cannot be); and the Markdown tables of folders of runs and records: the
seed table (mean ± spread), the runs' rates and digests, the lever table (Δ PSNR against the
recipe at the same budget), the determinism check (the tensor digests of a run and its
repeat), and a figure of their loss curves.
"""

from __future__ import annotations

import hashlib
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


def _pool(
    todo: list[dict], folder: Path, args, what: str, steps_only: int | None = None, finished=None
):
    """Run ``todo`` with at most ``args.jobs`` side by side (they share the GPU's memory);
    ``finished(name)`` is called as each job ends well."""
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
                    elif finished is not None:
                        finished(name)
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
    finished = None
    if args.records:  # each run's record as soon as it ends (what outlives the run folders)

        def finished(name: str) -> None:
            write_record(folder / name, args.records, args.commit, force=True)

    _pool(selected(steps, args), folder, args, "study", finished=finished)
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


def _logged(metrics: Path) -> list[dict]:
    """A stage's logged steps, every value but the rate (which differs from run to run)."""
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return [{k: v for k, v in json.loads(x).items() if k != "images_per_s"} for x in lines]


def _logged_agreement(first: Path, again: Path) -> str:
    """How many logged steps of two runs of one stage agree in every logged value but the
    rate (losses, gradient norm, mask ratio, learning rate), and the first that does not."""
    a, b = _logged(first / "metrics.jsonl"), _logged(again / "metrics.jsonl")
    if not (a and b):
        return ""
    equal = sum(x == y for x, y in zip(a, b))
    text = f"; {equal:,} of {max(len(a), len(b)):,} logged steps equal"
    differ = next((x["step"] for x, y in zip(a, b) if x != y), None)
    return text + (f" (the first difference at step {differ})" if differ is not None else "")


# ----------------------------------------------------------------------------- the records

CURVE_EVERY = 50  # logged steps between two points of a record's loss curve
REPORTS = ("eval", "eval_raw")  # a stage's reports: EMA and raw weights


def _report_summary(path: Path) -> dict | None:
    """What the tables read of an ``eval.json``: the scores, the thumbnail's, the latents'
    statistics, and on how many images the tokenizer beats the thumbnail (not the
    per-image lists)."""
    r = _report(path)
    if r is None:
        return None
    out = {k: r[k] for k in ("images", "tokenizer", "thumbnail", "latents") if k in r}
    out["beats_thumbnail"] = sum(i["psnr"] > i["thumb_psnr"] for i in r.get("per_image", []))
    return out


def _curve(logged: list[dict]) -> dict[str, list]:
    """The loss and reconstruction loss averaged over each ``CURVE_EVERY`` logged steps,
    at the window's last step."""
    out = {"step": [], "loss": [], "rec": []}
    for i in range(0, len(logged), CURVE_EVERY):
        window = logged[i : i + CURVE_EVERY]
        out["step"].append(window[-1]["step"])
        for key in ("loss", "rec"):
            values = [x[key] for x in window if isinstance(x.get(key), (int, float))]
            out[key].append(statistics.fmean(values) if values else None)
    return out


def record(run: Path, commit: str | None = None) -> dict:
    """A run folder as a record: per stage its steps, settings, median images/s, tensor
    digest, the sha256 of its logged values (all but the rate: two runs that log the same
    values have the same one), its loss curves (``_curve``), and its
    reports' scores. A few tens of kB where the folder holds checkpoints and megabytes of
    logs: what the tables read, kept where the folder cannot be (``recipe.py record``)."""
    digests = _digests(run)
    stages = {}
    for folder in sorted(p for p in run.glob("stage*") if p.is_dir()):
        metrics = folder / "metrics.jsonl"
        logged = _logged(metrics)
        text = json.dumps(logged, sort_keys=True).encode()
        stage = {
            "steps": logged[-1]["step"] + 1 if logged else 0,
            "images_per_s": _images_per_s(metrics),
            "digest": digests.get(folder.name),
            "logged": {"lines": len(logged), "sha256": hashlib.sha256(text).hexdigest()},
            "curve": _curve(logged),
            "reports": {
                kind: summary
                for kind in REPORTS
                if (summary := _report_summary(folder / kind / "eval.json"))
            },
        }
        config = folder / "config.json"
        if config.is_file():
            stage["config"] = json.loads(config.read_text())
        stages[folder.name] = stage
    for name, digest in digests.items():  # a stage whose folder is gone but whose log stayed
        stages.setdefault(name, {"digest": digest, "reports": {}})
    log = run / "recipe.log"
    started = log.read_text().splitlines()[0] if log.is_file() and log.stat().st_size else ""
    return {"name": run.name, "commit": commit, "started": started, "stages": stages}


def write_record(run: Path, into: Path, commit: str, force: bool = False) -> Path:
    """``into/NAME.json``: the record of the run folder ``run`` (`recipe.py record`); an
    existing record of that name is kept unless ``force``."""
    data = record(run, commit) if run.is_dir() else {"stages": {}}
    if not data["stages"]:
        error(f"{run} holds no stage (stage1/, stage2/ of `recipe.py run`)")
    path = into / f"{run.name}.json"
    if path.exists() and not force:
        error(f"{path} exists (--force replaces it)")
    into.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def runs(folders: list[Path]) -> dict[str, dict]:
    """Name → record of every run in ``folders``: run folders (read as records, their path
    kept as ``"folder"``) and ``NAME.json`` records; the first of a name wins."""
    out = {}
    for folder in folders:
        if not folder.is_dir():
            error(f"no folder {folder}")
        for path in sorted(folder.iterdir()):
            if path.name in out or path.stem in out:
                continue
            if path.is_dir() and ((path / "recipe.log").is_file() or any(path.glob("stage*"))):
                out[path.name] = {**record(path), "folder": path}
            elif path.suffix == ".json":
                try:
                    data = json.loads(path.read_text())
                except json.JSONDecodeError as e:
                    error(f"{path} is not JSON ({e}); a record is written by `recipe.py record`")
                if isinstance(data, dict) and "stages" in data:  # not probe.json
                    out[path.stem] = data
    return out


def _stage(run: dict | None, stage: str) -> dict:
    return (run or {}).get("stages", {}).get(stage, {})


def _stage_report(run: dict | None, stage: str, kind: str = "eval") -> dict | None:
    """A stage's report summary (``kind``: ``eval`` EMA weights, ``eval_raw`` raw), if any."""
    return _stage(run, stage).get("reports", {}).get(kind)


def _stage_digests(run: dict) -> dict[str, str]:
    """Stage → tensor digest of a record's finished stages."""
    return {s: v["digest"] for s, v in run.get("stages", {}).items() if v.get("digest")}


def _steps(run: dict | None) -> int | None:
    """The steps a run trained, summed over its stages."""
    return sum(s.get("steps", 0) for s in (run or {}).get("stages", {}).values()) or None


def _agreement(first: dict, again: dict, stage: str) -> str:
    """``_logged_agreement`` of two runs' stage: from their folders where both are here,
    else from their records' sha256 of the logged values."""
    if "folder" in first and "folder" in again:
        return _logged_agreement(first["folder"] / stage, again["folder"] / stage)
    a, b = _stage(first, stage).get("logged"), _stage(again, stage).get("logged")
    if not (a and b):
        return ""
    if a == b:
        return f"; {a['lines']:,} of {a['lines']:,} logged steps equal"
    return "; the logged values differ"


# ------------------------------------------------------------------------------ the tables


def _run_table(every: dict[str, dict]) -> list[str]:
    """Per full run (``maetok_s*``, ``plain_s*``, their repeats): the commit its record names
    (a run folder names none), each stage's median images/s, the tensor digests ``maetok
    train`` printed, and the last stage's EMA report."""
    names = sorted(n for n in every if re.search(r"_s\d", n))
    if not names:
        return []
    lines = [
        "| run | commit | images/s, Stage 1 | images/s, Stage 2 | tensors sha256 (per stage) "
        "| last stage, EMA weights |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        stages = every[name]["stages"]
        rates = [_stage(every[name], f"stage{s}").get("images_per_s") for s in (1, 2)]
        digests = [stages[s]["digest"] for s in sorted(stages) if stages[s].get("digest")]
        reports = [r["eval"] for s in sorted(stages) if "eval" in (r := stages[s]["reports"])]
        ema = (
            f"{reports[-1]['tokenizer']['psnr']:.2f} dB / {reports[-1]['tokenizer']['ssim']:.3f}"
            if reports
            else "–"
        )
        lines.append(
            f"| {name} | {every[name].get('commit') or '–'} "
            f"| {' | '.join(f'{r:,.0f}' if r else '–' for r in rates)} "
            f"| {' / '.join(digests) or '–'} | {ema} |"
        )
    return [*lines, ""]


def table(*folders: Path) -> str:
    """The seed table, the runs' rates and digests, the lever table and the determinism
    check of study folders (run folders and ``recipe.py record`` files), written to the
    first folder's ``tables.md`` too."""
    every = runs(list(folders))
    full = sorted(n for n in every if re.fullmatch(r"(maetok|plain)_s\d+", n))
    steps = _steps(every[full[0]]) if full else None
    where = ", ".join(str(f) for f in folders)
    lines = [f"Study in {where}: {steps or '?'} steps per full run.\n"]
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
        found = [every.get(pattern.format(seed)) for seed in (0, 1, 2)]
        raw = [r for run in found if (r := _stage_report(run, stage, "eval_raw"))]
        ema = [r for run in found if (r := _stage_report(run, stage))]
        if not raw and not ema:
            continue
        thumb = (raw or ema)[0]["thumbnail"]
        cells = []
        for reports in (raw, ema):
            cells.append(_mean_spread([r["tokenizer"]["psnr"] for r in reports], 2))
            cells.append(_mean_spread([r["tokenizer"]["ssim"] for r in reports], 3))
        wins = [f"{r['beats_thumbnail']}/{r['images']}" for r in raw]
        lines.append(
            f"| {label} | {len(raw or ema)} | {' | '.join(cells)} | {', '.join(wins) or '–'} |"
        )
    if thumb:
        lines.append(
            f"| thumbnail {thumb['side']}×{thumb['side']} bicubic | – | {thumb['psnr']:.2f} "
            f"| {thumb['ssim']:.3f} | – | – | – |"
        )
    lines.append("\n(± is the standard deviation over the seeds.)\n")
    lines += _run_table(every)

    base = every.get("lever_recipe")
    ref = _stage_report(base, "stage2")
    if ref:
        lines.append(f"Levers at {_steps(base)} steps, seed 0, one change each:\n")
        lines.append(
            "| change from the recipe | PSNR (dB) | Δ PSNR | SSIM | beats the thumbnail on "
            "| images/s (Stage 1) |"
        )
        lines.append("|---|---|---|---|---|---|")

        def row(label: str, r: dict, rate: float | None) -> str:
            p = r["tokenizer"]["psnr"]
            delta = "–" if r is ref else f"{p - ref['tokenizer']['psnr']:+.2f}"
            return (
                f"| {label} | {p:.2f} | {delta} | {r['tokenizer']['ssim']:.3f} "
                f"| {r['beats_thumbnail']}/{r['images']} | {f'{rate:,.0f}' if rate else '–'} |"
            )

        lines.append(row("none (the recipe)", ref, _stage(base, "stage1").get("images_per_s")))
        raw = _stage_report(base, "stage2", "eval_raw")
        if raw:
            lines.append(row("raw weights instead of EMA (same run)", raw, None))
        for i, lever in enumerate(LEVERS):
            run = every.get(f"lever_{i}")
            if run is None:
                continue  # not in this study
            r = _stage_report(run, "stage2")
            if r is None:
                lines.append(f"| {lever} | (did not finish) | | | | |")
                continue
            lines.append(row(lever, r, _stage(run, "stage1").get("images_per_s")))
    lines.append("\nDeterminism (tensor sha256 of the same command run twice):\n")
    repeats = sorted(n for n in every if n.endswith("_repeat"))
    if not repeats:
        lines.append("- no repeat in this folder (a run NAME_repeat of NAME's command)")
    for name in repeats:
        source, again = every.get(name.removesuffix("_repeat"), {}), every[name]
        first, second = _stage_digests(source), _stage_digests(again)
        for stage in sorted(first.keys() & second.keys()):
            a, b = first[stage], second[stage]
            same = "identical" if a == b else "DIFFERENT"
            logged = _agreement(source, again, stage)
            lines.append(f"- {name}, {stage}: {a} and {b}: {same}{logged}")
    text = "\n".join(lines)
    (folders[0] / "tables.md").write_text(text + "\n")
    curves(every, folders[0] / "curves.png")
    return text


def _joined(run: dict, key: str = "rec") -> tuple[list[int], list]:
    """A run's curve over its stages one after the other (Stage 2's steps after Stage 1's)."""
    steps, values, offset = [], [], 0
    for name in sorted(run.get("stages", {})):
        stage = run["stages"][name]
        curve = stage.get("curve", {})
        steps += [offset + s for s in curve.get("step", [])]
        values += curve.get(key, [])
        offset += stage.get("steps", 0)
    return steps, values


def curves(every: dict[str, dict], path: Path) -> Path | None:
    """``path``: the reconstruction loss of the full runs and of the lever runs (each
    averaged over ``CURVE_EVERY`` logged steps, Stage 2 after Stage 1), if any run has one."""
    from maetok.viz import plot_overlay

    full = {n: _joined(every[n]) for n in sorted(every) if re.search(r"_s\d", n)}
    names = {"lever_recipe": "the recipe"}
    for i, (lever, change) in enumerate(LEVERS.items()):  # another loss.rec logs its own loss
        rec = change.get("loss.rec")
        names[f"lever_{i}"] = lever + (f" (its {rec.upper()} loss)" if rec else "")
    levers = {names[n]: _joined(every[n]) for n in names if n in every}
    panels = [
        (title, lines)
        for title, lines in (("full runs", full), ("levers, seed 0", levers))
        if any(v is not None for _, values in lines.values() for v in values)
    ]
    if not panels:
        return None
    return plot_overlay(panels, path, ylabel="reconstruction loss (mean of 50 steps)")

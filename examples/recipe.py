"""The tokenizer recipe on real photographs, its lever study and its three-seed table.

Train on ``photos/`` (2,400 mixed photographs) plus ``bsds500/train``, report on
``bsds500/val`` (centre crops, never trained on), against the equal-size thumbnail::

    # one run of the recipe (resumable: run the same command again to continue it)
    python examples/recipe.py run runs/recipe/maetok_s0 --variant maetok --seed 0
    python examples/recipe.py run runs/recipe/plain_s0 --variant plain --seed 0

    # the whole study on one GPU: the recipe and the plain autoencoder at three seeds, a
    # repeat of seed 0 (the determinism check), and every lever at half the budget, all
    # at once; --budget-min sizes the steps from a short probe of the GPU's throughput
    python examples/recipe.py study runs/recipe --budget-min 15

    # part of a study (the rest in later sessions, into the same folder): the recipe and
    # the first three levers at a quarter of 14,000 steps
    python examples/recipe.py study runs/recipe --steps 14000 --lever-share 0.25 \
        --only lever_recipe,lever_0,lever_1,lever_2

    # the same, writing each run's record (below) into docs/recipe_runs as it ends
    python examples/recipe.py study runs/recipe --steps 14000 --only plain_s1,plain_s2 \
        --records docs/recipe_runs --commit REV

    # the tables (Markdown) of a study folder
    python examples/recipe.py table runs/recipe

    # runs as records (tens of kB each, what the tables read) for a folder that outlives
    # the run folders; the tables of records and run folders together
    python examples/recipe.py record runs/recipe/maetok_s0 --into docs/recipe_runs --commit REV
    python examples/recipe.py table docs/recipe_runs runs/recipe

    # a run's missing reports (e.g. after deleting one), all in one process
    python examples/recipe.py evals runs/recipe/maetok_s0

    # a finished run → the package's tokenizer (maetok/weights/), if it beats the
    # thumbnail: its model card, a picture sheet in docs/ and the card's Markdown
    python examples/recipe.py ship runs/recipe/maetok_s0

``--data`` is the folder holding ``photos/`` and ``bsds500/`` (default ``../shared/data``).
The training folder is ``OUT/train_data``: links to the two training sets, which
``maetok.data.ImageFolder`` follows. Every run is ``maetok train`` (Stage 1, then Stage 2
from its checkpoint; the plain autoencoder trains the same number of steps in one stage
with no mask and no auxiliary decoders), ``maetok eval``'s report of each stage's EMA and
raw weights (a lever run: only the reports its table reads), written by one process that
loads the images, scores the thumbnail and compiles the model once, and for a full MAETok
run the
export ``ship`` takes. A run that is cut off continues with ``--resume`` from its last
checkpoint when the same command is given again; finished stages are skipped.

This file holds the recipe, one run and the command line; ``recipe_study.py`` the study and
its tables; ``recipe_ship.py`` the shipping.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing it
    sys.path.insert(0, str(ROOT))
MAETOK = [sys.executable, "-m", "maetok.cli"]

# The recipe: settings of every run (``--set`` fields of `maetok train`); a lever changes one.
RECIPE = {
    # explicit-softmax attention: XLA 0.11.2 cannot compile the step with cuDNN's fused
    # attention under --xla_gpu_deterministic_ops (an internal IndexError)
    "model.attention": "plain",
    "model.query_pos": True,  # learnable decoder query positions: faster convergence
    # every block stack unrolled (depths 12, 8, 3): no per-layer copies, 35 % faster on the
    # GPU; there it rounds differently from rolled (on the CPU the same checksums)
    "model.unroll": 12,
    "model.compute_dtype": "bfloat16",
    "train.batch_size": 64,
    "train.lr": 2e-3,
    "train.warmup_steps": 100,
    "train.b2": 0.95,
    "train.grad_clip": 1.0,
    "train.ema_decay": 0.999,
    "train.mask_min": 0.0,  # r ~ U[0, 0.6]: the encoder also sees lightly masked images
    "train.mask_max": 0.6,
    "loss.gamma": {"hog": 0.1, "conv": 0.1, "pixel": 0.1},
    "loss.rec": "mse",
    # the perceptual pyramid: +0.5 dB after Stage 1, +0.6 dB after Stage 2 on the CPU proxy
    # (README, "Levers on the CPU proxy"); the three-seed study of the README ran without it
    "loss.lambda_percep": 1.0,
    "train.log_every": 50,
    "train.ckpt_every": 500,
    "train.sample_every": 1000,
}
STAGE2_SHARE = 0.4  # of the steps; Stage 2 anneals r 0.6 → 0 over its first three quarters
PLAIN = {"train.mask_min": 0.0, "train.mask_max": 0.0, "model.aux_targets": []}
DEFAULT_STEPS = 14000  # Stage 1 + Stage 2: 23.7 dB on BSDS500 val (README, Quality)
LEVER_SHARE = 0.5  # of the steps, for each lever run and the recipe it is measured against

# One change each from RECIPE (the last, two), measured at LEVER_SHARE of the budget against
# the recipe at the same budget. ``stage2_share`` is not a config field: it moves steps from
# Stage 1 to Stage 2.
LEVERS = {
    "lr 1e-3": {"train.lr": 1e-3},
    "lr 4e-3": {"train.lr": 4e-3},
    "warm-up 500 steps": {"train.warmup_steps": 500},
    "β2 = 0.99": {"train.b2": 0.99},
    "no gradient clipping": {"train.grad_clip": 0.0},
    "paper masking: r ~ U[0.4, 0.6], γ = 1": {
        "train.mask_min": 0.4,
        "loss.gamma": {"hog": 1.0, "conv": 1.0, "pixel": 1.0},
    },
    "L1 reconstruction": {"loss.rec": "l1"},
    "no perceptual loss (λ1 = 0)": {"loss.lambda_percep": 0.0},
    "perceptual warm-up: λ1 from 0 over 500 steps": {"loss.percep_warmup": 500},
    "longer Stage 2 (60 % of steps)": {"stage2_share": 0.6},
    # after levers 0–2 (README, "Levers on the GPU"): the start, further
    "warm-up 1,000 steps": {"train.warmup_steps": 1000},
    "lr 1e-3 and warm-up 500 steps (two changes)": {"train.lr": 1e-3, "train.warmup_steps": 500},
}


def plain(settings: dict) -> dict:
    """``settings`` for the plain autoencoder: no mask, no auxiliary decoders (so no γ)."""
    return {**{k: v for k, v in settings.items() if k != "loss.gamma"}, **PLAIN}


def error(message: str) -> NoReturn:
    """Stop with one line, ``recipe: error: …``, and exit status 2 (as `maetok` does)."""
    print(f"recipe: error: {message}", file=sys.stderr)
    sys.exit(2)


def _names(text: str) -> list[str]:
    """A comma-separated option (``--only``, ``--evals``) as a list, empty items dropped."""
    return [name for name in text.split(",") if name]


def _sets(settings: dict) -> list[str]:
    out = []
    for key, value in settings.items():
        out += ["--set", f"{key}={json.dumps(value)}"]
    return out


def _done_steps(ckpt: Path) -> int | None:
    """The step a checkpoint was saved at, or None if there is none."""
    if not ckpt.is_file():
        return None
    from maetok.checkpoint import read_header

    return int(read_header(ckpt)[1]["step"])


def logged_steps(metrics: Path) -> int:
    """The steps a stage trained, from the last line of its ``metrics.jsonl``."""
    return int(json.loads(metrics.read_text().splitlines()[-1])["step"]) + 1


def _train(out: Path, steps: int, args: list[str], log) -> None:
    """``maetok train`` into ``out`` for ``steps``; continues a cut-off run, skips a done one."""
    done = _done_steps(out / "checkpoint.safetensors")
    if done is not None and done >= steps:
        return
    cmd = [*MAETOK, "train", "--no-progress", "--out", str(out)]
    cmd += ["--resume"] if done is not None else [*args, "--steps", str(steps)]
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)


EVAL_BATCH = 50  # images per batch of an evaluation (BSDS500 val: two batches of 50)


def _eval(ckpt: Path, out: Path, val: Path, log, ema: bool = True) -> None:
    """``maetok eval`` of one file into ``out`` (kept if there), as a process of its own."""
    if (out / "eval.json").is_file():
        return
    cmd = [*MAETOK, "eval", "--checkpoint", str(ckpt), "--data", str(val), "--out", str(out)]
    cmd += ["--batch-size", str(EVAL_BATCH)] + (["--ema"] if ema else [])
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)


def _finished(ckpt: Path) -> bool:
    """Whether the stage of ``ckpt`` trained all the steps its ``config.json`` asks for."""
    config = ckpt.parent / "config.json"
    if not config.is_file():
        return False
    return _done_steps(ckpt) >= json.loads(config.read_text())["train"]["steps"]


def pending_evals(out: Path, evals: list[str] | None = None) -> list[tuple[Path, bool, Path]]:
    """``(checkpoint, use_ema, report folder)`` of every report of a run not yet written: the
    EMA (``STAGE/eval``) and raw (``STAGE/eval_raw``) weights of each finished stage (a stage
    cut off is reported once it is done), only those ``evals`` names if given."""
    jobs = []
    for ckpt in sorted(out.glob("stage*/checkpoint.safetensors")):
        if not _finished(ckpt):
            continue
        for folder, ema in (("eval", True), ("eval_raw", False)):
            report = ckpt.parent / folder
            wanted = evals is None or f"{ckpt.parent.name}/{folder}" in evals
            if wanted and not (report / "eval.json").is_file():
                jobs.append((ckpt, ema, report))
    return jobs


def evaluate_run(out: Path, val: Path, evals: list[str] | None = None) -> int:
    """``maetok eval`` of every pending report of ``out``, in this one process (the images,
    the thumbnail's scores and the compiled model are shared). Returns how many it wrote."""
    from maetok.errors import MAETokError
    from maetok.evaluate import evaluate_checkpoints

    if not any(_finished(c) for c in out.glob("stage*/checkpoint.safetensors")):
        error(f"{out} holds no finished stage (stage*/checkpoint.safetensors at its last step)")
    jobs = pending_evals(out, evals)
    if jobs and not val.is_dir():
        error(f"no report folder {val} (pass --data or --val)")
    try:
        evaluate_checkpoints(jobs, val, batch_size=EVAL_BATCH)
    except MAETokError as e:
        error(str(e))
    return len(jobs)


def train_folder(data: Path, out: Path) -> Path:
    """``out/train_data``: links to ``photos/`` and ``bsds500/train`` under ``data``."""
    folder = out / "train_data"
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in (("photos", data / "photos"), ("bsds500_train", data / "bsds500/train")):
        if not source.is_dir():
            error(f"no training folder {source} (pass --data)")
        link = folder / name
        if not link.exists():
            link.symlink_to(source.resolve(), target_is_directory=True)
    return folder


def run_one(
    out: Path,
    variant: str,
    seed: int,
    steps: int,
    train: Path,
    val: Path,
    preset: str = "seed",
    changes: dict | None = None,
    probe: bool = False,
    evals: list[str] | None = None,
) -> None:
    """One run of the recipe with ``changes``: Stage 1 → Stage 2 (or the plain autoencoder
    in one stage), then ``maetok eval`` of each stage's checkpoint, EMA and raw weights
    (only the report folders ``evals`` names, e.g. ``stage2/eval``, if given), and for a
    full MAETok run the export ``recipe.py ship`` takes (``stage2/export.safetensors``,
    32 MB for ``seed``, which leaves the machine where checkpoints cannot). ``probe``:
    the first stage only, ``steps`` long, logging every 20 steps, no evaluation."""
    settings = {**RECIPE, **(changes or {})}
    share = settings.pop("stage2_share", STAGE2_SHARE)
    if variant == "plain":
        settings = plain(settings)
    if probe:
        settings["train.log_every"] = 20
    base = ["--preset", preset, "--data", str(train), "--seed", str(seed), *_sets(settings)]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "recipe.log", "a") as log:
        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {variant} seed {seed} {steps} steps\n")
        log.flush()
        if probe:
            _train(out / "stage1", steps, base, log)
            return
        if variant == "plain":
            _train(out / "stage1", steps, base, log)
        else:
            s2 = max(1, round(steps * share))
            _train(out / "stage1", steps - s2, base, log)
            stage2 = [
                *base,
                "--stage",
                "2",
                "--init-from",
                str(out / "stage1/checkpoint.safetensors"),
                "--set",
                f"train.anneal_steps={max(1, s2 * 3 // 4)}",
                "--set",
                f"train.warmup_steps={min(settings['train.warmup_steps'], s2 // 10)}",
            ]
            _train(out / "stage2", s2, stage2, log)
        if pending_evals(out, evals):  # EMA and raw weights of every stage, in one process
            cmd = [sys.executable, __file__, "evals", str(out), "--val", str(val)]
            cmd += ["--evals", ",".join(evals)] if evals is not None else []
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
        if variant == "maetok" and evals is None:  # a full run: what `ship` would take
            from examples.recipe_ship import export_better
            from maetok.errors import MAETokError

            try:
                log.write(f"recipe: wrote {export_better(out)} (for `recipe.py ship`)\n")
            except MAETokError as e:  # e.g. weights beyond float16: the run stays as it is
                log.write(f"recipe: no export for `recipe.py ship`: {e}\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="recipe", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("run", "study"):
        q = sub.add_parser(name)
        q.add_argument("out", type=Path)
        q.add_argument("--data", type=Path, default=ROOT.parent / "shared/data")
        q.add_argument("--train", type=Path, help="training folder (default: OUT/train_data)")
        q.add_argument("--preset", default="seed")
        q.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="Stage 1 + Stage 2")
    run_p = sub.choices["run"]
    run_p.add_argument("--variant", choices=("maetok", "plain"), default="maetok")
    run_p.add_argument("--seed", type=int, default=0)
    run_p.add_argument("--changes", type=json.loads, default=None, help="JSON of --set fields")
    run_p.add_argument("--stage1-only", action="store_true", help=argparse.SUPPRESS)
    run_p.add_argument(
        "--evals",
        type=_names,
        help="only these reports (e.g. stage2/eval,stage2/eval_raw); default: every stage, "
        "EMA and raw",
    )
    study_p = sub.choices["study"]
    study_p.add_argument("--budget-min", type=float, help="size the steps to this many minutes")
    study_p.add_argument("--probe-steps", type=int, default=200)
    study_p.add_argument(
        "--seeds", type=lambda t: tuple(int(x) for x in t.split(",")), default=(0, 1, 2)
    )
    study_p.add_argument("--levers", type=int, help="only the first N levers (0: none)")
    study_p.add_argument("--jobs", type=int, default=6, help="runs side by side")
    study_p.add_argument(
        "--lever-share", type=float, default=LEVER_SHARE, help="each lever run's share of --steps"
    )
    study_p.add_argument(
        "--records", type=Path, help="write each run's record here as it ends (`recipe.py record`)"
    )
    study_p.add_argument("--commit", help="with --records: the commit the runs train at")
    study_p.add_argument(
        "--only",
        type=_names,
        help="run only these jobs (comma-separated names, e.g. lever_recipe,lever_0)",
    )
    sub.add_parser("table").add_argument(
        "out", type=Path, nargs="+", help="folders of runs and records (the first takes tables.md)"
    )
    record_p = sub.add_parser("record", help="runs → records the tables read (a few tens of kB)")
    record_p.add_argument("runs", type=Path, nargs="+", help="run folders (of `recipe.py run`)")
    record_p.add_argument("--into", type=Path, required=True, help="the records' folder")
    record_p.add_argument("--commit", required=True, help="the commit the runs trained at")
    record_p.add_argument("--force", action="store_true", help="replace existing records")
    evals_p = sub.add_parser("evals", help="write a run's missing reports, in one process")
    evals_p.add_argument("out", type=Path, help="the run folder (of `recipe.py run`)")
    evals_p.add_argument("--data", type=Path, default=ROOT.parent / "shared/data")
    evals_p.add_argument("--val", type=Path, help="the report folder (default: DATA/bsds500/val)")
    evals_p.add_argument("--evals", type=_names, help="only these reports, e.g. stage2/eval")
    ship_p = sub.add_parser("ship", help="a finished run → the package's pretrained tokenizer")
    ship_p.add_argument("out", type=Path, help="the run folder (of `recipe.py run`)")
    ship_p.add_argument("--weights", type=Path, help="default: maetok.pretrained.SHIPPED")
    ship_p.add_argument("--data", type=Path, default=ROOT.parent / "shared/data")
    ship_p.add_argument("--docs", type=Path, default=ROOT / "docs", help="for the picture sheet")
    ship_p.add_argument(
        "--force", action="store_true", help="ship it even if it does not beat the thumbnail"
    )
    ship_p.add_argument(
        "--exported",
        type=Path,
        help="the run's Stage-2 weights, exported (`maetok export`) where its checkpoints are",
    )
    args = p.parse_args(argv)
    if args.command == "table":
        from examples.recipe_study import table

        print(table(*args.out))
        return 0
    if args.command == "record":
        from examples.recipe_study import write_record

        for run in args.runs:
            print(f"recipe: wrote {write_record(run, args.into, args.commit, args.force)}")
        return 0
    if args.command == "evals":
        wrote = evaluate_run(args.out, args.val or args.data / "bsds500/val", args.evals)
        print(f"recipe: {wrote} report(s) written in {args.out}")
        return 0
    if args.command == "ship":
        from examples.recipe_ship import model_card, ship
        from maetok.pretrained import SHIPPED

        card = ship(
            args.out, args.weights or SHIPPED, args.data, args.docs, args.force, args.exported
        )
        print(model_card(card))
        return 0
    val = args.data / "bsds500/val"
    if args.command == "study":
        from examples.recipe_study import selected, study

        selected(args.steps, args)  # a bad --only stops here, before anything is written
        if args.records and not args.commit:
            error("--records needs --commit (the commit the runs train at)")
        args.train = args.train or train_folder(args.data, args.out)
        study(args.out, args)
        return 0
    train = args.train or train_folder(args.data, args.out.parent)
    run_one(
        args.out,
        args.variant,
        args.seed,
        args.steps,
        train,
        val,
        args.preset,
        args.changes,
        probe=args.stage1_only,
        evals=args.evals,
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # runs share one GPU
    sys.exit(main())

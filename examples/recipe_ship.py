"""``recipe.py ship``: a finished recipe run → the tokenizer the package ships, and its card.

From ``RUN`` (of ``recipe.py run``) it takes the Stage-2 weights, EMA or raw, whichever
gives the higher PSNR on BSDS500 val in the run's own reports, and only if that PSNR is
above the equal-size thumbnail's (``--force`` ships it anyway). It exports them to 16-bit
(``maetok.pretrained.export_weights``) beside the weights path, refuses a file over
``maetok.pretrained.MAX_SHIPPED_BYTES``, evaluates that exported file with ``maetok eval``
(``RUN/shipped_eval``), and only then renames it into place, so a refused or failed ship
leaves the shipped file as it was. A run trained on another machine, whose checkpoints
stayed there, ships from its Stage-2 weights exported there: ``RUN/stage2/export.safetensors``,
which ``recipe.py run`` writes at the end of a full run, or ``--exported`` (of ``maetok
export``); each stage's steps then come from its ``metrics.jsonl`` and its data from the
recipe's training folder under ``--data``. Beside it goes the model card
(``NAME.json``: source, settings, data, sha256 and the exported file's numbers); the eval's
picture sheet goes to ``DOCS/shipped_reconstructions.jpg``; ``model_card`` gives the card as
Markdown.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from pathlib import Path

from examples import recipe
from examples.recipe import error

REPORTS = {"ema": "eval", "raw": "eval_raw"}  # weights → the Stage-2 folder of their report
EXPORTED = "stage2/export.safetensors"  # a finished run's better Stage-2 weights, 16-bit
SHEET = "shipped_reconstructions.jpg"
SHEET_MAX_BYTES = 1_500_000
JPEG_QUALITIES = (90, 80, 70, 60)  # the first whose sheet fits SHEET_MAX_BYTES is kept
# the config fields a card lists per stage: the recipe's (less the cadences of its logs and
# pictures), and what shapes the model and the stage
CARD_FIELDS = (
    *(key for key in recipe.RECIPE if not key.endswith("_every")),
    "model.image_size",
    "model.num_latent_tokens",
    "model.latent_dim",
    "train.seed",
    "train.stage",
    "train.steps",
    "train.anneal_steps",
)


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (as README links it), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(recipe.ROOT)) if path.is_relative_to(recipe.ROOT) else str(path)


def _stage(folder: Path, data: dict | None = None) -> dict:
    """Steps done, the ``CARD_FIELDS`` of its config.json, and the data of a finished stage:
    from its checkpoint, or without one (``data`` given), from its metrics.jsonl and
    ``data``."""
    from maetok.checkpoint import read_header

    config, checkpoint = folder / "config.json", folder / "checkpoint.safetensors"
    metrics = folder / "metrics.jsonl"
    if not config.is_file() or not (checkpoint.is_file() or (data and metrics.is_file())):
        what = "checkpoint.safetensors" if data is None else "checkpoint.safetensors or metrics"
        error(f"{folder} holds no finished stage (config.json and {what})")
    sections = json.loads(config.read_text())
    settings = {}
    for key in CARD_FIELDS:
        section, _, name = key.partition(".")
        if name in sections.get(section, {}):
            settings[key] = sections[section][name]
    if checkpoint.is_file():
        meta = read_header(checkpoint)[1]
        return {"steps": int(meta["step"]), "settings": settings, "data": meta.get("data")}
    return {"steps": recipe.logged_steps(metrics), "settings": settings, "data": data}


def _training_data(data: Path, run: Path) -> dict:
    """The identity (as checkpoints record it) of the recipe's training folder for ``run``."""
    from maetok.config import Config
    from maetok.run import data_identity, open_dataset

    cfg = Config.from_json((run / "stage1" / "config.json").read_text())
    folder = recipe.train_folder(data, run.parent)
    return data_identity(open_dataset(str(folder), cfg, progress=False))


def _describe(data: dict | None) -> str:
    """What a stage trained on: its image count and the folders (or links) it holds."""
    from maetok.run import describe_data

    if not data:
        return "data not recorded in the checkpoint"
    folder = Path(data.get("folder", ""))
    if data.get("kind") != "folder" or not folder.is_dir():
        return describe_data(data)
    parts = sorted(p.name for p in folder.iterdir() if p.is_dir())
    return f"{data['images']:,} images in " + (", ".join(f"{p}/" for p in parts) or str(folder))


def _jpeg(png: Path, jpg: Path) -> Path:
    """``png`` as a JPEG at ``jpg``, at the best of ``JPEG_QUALITIES`` under SHEET_MAX_BYTES."""
    from PIL import Image

    image = Image.open(png).convert("RGB")
    for quality in JPEG_QUALITIES:
        data = io.BytesIO()
        image.save(data, "JPEG", quality=quality, optimize=True)
        if data.tell() <= SHEET_MAX_BYTES:
            break
    jpg.parent.mkdir(parents=True, exist_ok=True)
    jpg.write_bytes(data.getvalue())
    return jpg


def better_weights(run: Path) -> tuple[str, dict]:
    """Which Stage-2 weights of a finished ``run`` to ship, ``"ema"`` or ``"raw"`` (the higher
    PSNR in the run's own reports), and both reports; one line if a report is missing."""
    reports = {}
    for which, folder in REPORTS.items():
        path = run / "stage2" / folder / "eval.json"
        if not path.is_file():
            error(f"{run} is not a finished recipe run: no {path} (finish it with `recipe.py run`)")
        reports[which] = json.loads(path.read_text())
    return max(reports, key=lambda w: reports[w]["tokenizer"]["psnr"]), reports


def export_better(run: Path) -> Path:
    """``RUN/stage2/export.safetensors``: the weights ``ship`` would take, in 16 bits, written
    where the run trained so that it can ship from a machine its checkpoints never reach."""
    from maetok import pretrained

    out = run / EXPORTED
    if not out.is_file():  # (written atomically: a cut-off export leaves none)
        which, _ = better_weights(run)
        pretrained.export_weights(run / "stage2/checkpoint.safetensors", out, which == "ema")
    return out


def ship(
    run: Path,
    weights: Path,
    data: Path,
    docs: Path,
    force: bool = False,
    exported: Path | None = None,
) -> dict:
    """Ship the better Stage-2 weights of ``run`` to ``weights`` with its card; the card.
    ``exported``: those weights exported already (for a run whose checkpoints are elsewhere)."""
    from maetok import checkpoint as ckpt
    from maetok import pretrained
    from maetok.errors import MAETokError
    from maetok.evaluate import SHEET_NAME

    stage2 = run / "stage2"
    which, reports = better_weights(run)
    if exported is None and (run / EXPORTED).is_file():
        exported = run / EXPORTED  # written by `recipe.py run` where the run trained
    ours, thumb = reports[which]["tokenizer"]["psnr"], reports[which]["thumbnail"]
    beats = ours > thumb["psnr"]
    if not beats and not force:
        error(
            f"the {which} weights of {run} give {ours:.2f} dB on BSDS500 val, not above the "
            f"{thumb['side']}×{thumb['side']} thumbnail's {thumb['psnr']:.2f} dB; nothing "
            "shipped (--force ships it anyway)"
        )
    val = data / "bsds500/val"
    if not val.is_dir():
        error(f"no validation folder {val} (pass --data)")
    identity = None
    if exported is not None:
        _check_export(exported, which, stage2)
        identity = _training_data(data, run)
    stages = {name: _stage(run / name, identity) for name in ("stage1", "stage2")}

    if weights.is_dir():
        error(f"--weights {weights} is a folder; give the .safetensors file to write")
    staged = weights.with_name(f".{weights.stem}.staged{weights.suffix}")
    try:
        try:
            if exported is None:
                pretrained.export_weights(stage2 / "checkpoint.safetensors", staged, which == "ema")
            else:
                staged.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(exported, staged)
        except MAETokError as e:
            error(str(e))
        size = staged.stat().st_size
        if size > pretrained.MAX_SHIPPED_BYTES:
            error(
                f"the exported file is {size / 1e6:.1f} MB, over the "
                f"{pretrained.MAX_SHIPPED_BYTES / 1e6:.0f} MB a shipped tokenizer may take"
            )
        out = run / "shipped_eval"
        (out / "eval.json").unlink(missing_ok=True)  # recipe._eval keeps an existing report
        with open(run / "recipe.log", "a") as log:
            try:
                recipe._eval(staged, out, val, log, ema=False)
            except subprocess.CalledProcessError:
                error(f"`maetok eval` of the exported file failed; see {run / 'recipe.log'}")
        report = json.loads((out / "eval.json").read_text())
        flat, _, meta = ckpt.load_tree(staged)
        card = {
            "file": _shown(weights),
            "card": _shown(weights.with_suffix(".json")),
            "bytes": size,
            "sha256": ckpt.file_sha256(staged),
            "dtype": "float16",
            "parameters": sum(int(a.size) for a in flat.values()),
            "weights": which,
            "run": _shown(run),
            "checkpoint_sha256": meta["source_sha256"],
            "seed": stages["stage2"]["settings"].get("train.seed"),
            "stages": stages,
            "training_data": _describe(stages["stage1"]["data"]),
            "exported_elsewhere": exported is not None,  # from an export, not the checkpoint
            "forced": not beats,  # shipped although the run's reports are below the thumbnail
            "run_reports": {w: reports[w]["tokenizer"] for w in REPORTS},
            "bsds500_val": {
                "folder": str(val),
                "images": report["images"],
                "tokenizer": report["tokenizer"],
                "thumbnail": report["thumbnail"],
                "images_beating_thumbnail": sum(
                    i["psnr"] > i["thumb_psnr"] for i in report["per_image"]
                ),
            },
            "sheet": _shown(docs / SHEET),
        }
        os.replace(staged, weights)  # the same folder: the shipped file changes at once
    finally:
        staged.unlink(missing_ok=True)
    ckpt.write_text(weights.with_suffix(".json"), json.dumps(card, indent=2) + "\n")
    _jpeg(out / SHEET_NAME, docs / SHEET)
    print(f"recipe: shipped {weights} ({size / 1e6:.1f} MB, {which} weights) and its card")
    return card


def _check_export(path: Path, which: str, stage2: Path) -> None:
    """``path`` is a `maetok export` file of the ``which`` weights, exported from a checkpoint
    of the config in ``stage2/config.json``, or stop with one line."""
    from maetok.checkpoint import read_header
    from maetok.config import Config
    from maetok.errors import MAETokError
    from maetok.run import config_diff, describe_diff

    if not path.is_file():
        error(f"--exported {path}: no such file")
    try:
        cfg, meta = read_header(path)
    except MAETokError as e:
        error(str(e))
    diff = config_diff(Config.from_json((stage2 / "config.json").read_text()), cfg)
    if diff:
        error(f"--exported {path} is not from {stage2}: its config differs ({describe_diff(diff)})")
    if not meta.get("weights_only"):
        error(f"--exported {path} is not a `maetok export` file")
    if meta.get("weights") != which:
        error(
            f"--exported {path} holds the {meta.get('weights')} weights, but the run's "
            f"reports favour its {which} weights (export them with{'' if which == 'ema' else 'out'}"
            " --ema)"
        )


def model_card(card: dict) -> str:
    """The model card of ``ship`` as a Markdown section for the README."""
    val, stages = card["bsds500_val"], card["stages"]
    ours, thumb = val["tokenizer"], val["thumbnail"]
    first, second = stages["stage1"]["settings"], stages["stage2"]["settings"]
    size = first.get("model.image_size")
    changed = {k: v for k, v in second.items() if first.get(k) != v}
    total = stages["stage1"]["steps"] + stages["stage2"]["steps"]
    lines = [
        "### The shipped tokenizer",
        "",
        f"`{card['file']}`: {card['parameters'] / 1e6:.1f} M parameters, "
        f"{card['bytes'] / 1e6:.1f} MB in float16, sha256 `{card['sha256']}`. The "
        f"{'EMA' if card['weights'] == 'ema' else 'raw'} weights of `{card['run']}` (seed "
        f"{card['seed']}: Stage 1 for {stages['stage1']['steps']:,} steps, then Stage 2 for "
        f"{stages['stage2']['steps']:,}), trained on {card['training_data']}. Written with its "
        f"model card `{card['card']}` by `python examples/recipe.py ship {card['run']}`"
        + (
            " from its Stage-2 weights as exported where it trained."
            if card.get("exported_elsewhere")
            else "."
        ),
        "",
        "Trained by `python examples/recipe.py run "
        f"{card['run']} --variant maetok --seed {card['seed']} --steps {total}`.",
        "",
        f"| BSDS500 val ({val['images']} centre crops, {size}²) | PSNR (dB) | SSIM "
        "| beats the thumbnail on |",
        "|---|---|---|---|",
        f"| the shipped file | {ours['psnr']:.2f} | {ours['ssim']:.3f} "
        f"| {val['images_beating_thumbnail']}/{val['images']} |",
        f"| thumbnail {thumb['side']}×{thumb['side']} bicubic | {thumb['psnr']:.2f} "
        f"| {thumb['ssim']:.3f} | – |",
        "",
        "Stage 1: " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in first.items()) + ".",
        "Stage 2 changes: " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in changed.items()) + ".",
    ]
    if ours["psnr"] <= thumb["psnr"]:
        forced = " (shipped with `--force`)" if card["forced"] else ""
        lines += ["", f"It does not beat the thumbnail{forced}."]
    lines += [
        "",
        f"![The shipped tokenizer on BSDS500 val]({card['sheet']})",
        "*Originals, reconstructions by the shipped file with PSNR/SSIM, |error| ×4.*",
    ]
    return "\n".join(lines)

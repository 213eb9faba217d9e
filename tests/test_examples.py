"""The examples run end to end and report what they promise: the CPU proxy of the BSDS500
recipe, the quality table, and MAETok inside Marble (under the test suite's strict host)."""

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from examples.cpu_proxy import main
from tests import marble_host as host

ROOT = Path(__file__).resolve().parents[1]


def _photos(folder, rng, n):
    folder.mkdir(parents=True)
    for i in range(n):  # shrunk ×4 by the proxy: at least 64² must remain
        arr = rng.integers(0, 256, (264, 280 + 8 * i, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"p{i}.jpg")


def test_cpu_proxy_reports_curve_mask_ratios_and_thumbnail(tmp_path, rng):
    _photos(tmp_path / "train", rng, 6)
    _photos(tmp_path / "val", rng, 3)
    r = main("smoke", {"steps": 4, "train": {"batch_size": 2}}, tmp_path, tmp_path / "saved")
    assert len(r["val_psnr_curve"]) == 4 and all(np.isfinite(r["val_psnr_curve"]))
    assert set(r["by_mask_ratio"]) == {0.0, 0.02, 0.1, 0.5}
    assert r["by_mask_ratio"][0.0] == r["val_psnr_curve"][-1]  # r = 0 is the plain evaluation
    assert 5 < r["thumbnail_psnr"] < 60 and np.isfinite(r["rec"])
    # Stage 2 from the saved parameters: the encoder starts where the first run ended
    r2 = main(
        "s2",
        {"steps": 2, "init": "smoke", "train": {"batch_size": 2, "stage": 2}},
        tmp_path,
        tmp_path / "saved",
    )
    a, b = (np.load(tmp_path / "saved" / f"{n}.npz") for n in ("smoke", "s2"))
    enc = [k for k in a.files if k.startswith("encoder/")]
    assert enc and all(np.array_equal(a[k], b[k]) for k in enc)  # frozen in Stage 2
    assert any(not np.array_equal(a[k], b[k]) for k in a.files if k.startswith("decoder/"))
    assert np.isfinite(r2["val_psnr_curve"]).all()


def _recipe_study_folder(tmp_path):
    """A study folder: three seeds, the lever recipe, one lever, two repeats (one differs)."""
    import json

    def report(folder, psnr, beats=0):
        folder.mkdir(parents=True)
        per_image = [
            {"psnr": psnr + (1 if i < beats else -1), "thumb_psnr": psnr} for i in range(4)
        ]
        r = {
            "images": 4,
            "tokenizer": {"psnr": psnr, "ssim": psnr / 100},
            "thumbnail": {"side": 37, "values": 4107, "psnr": 22.07, "ssim": 0.476},
            "per_image": per_image,
        }
        (folder / "eval.json").write_text(json.dumps(r))

    def trained(run, *steps):  # a run's metrics.jsonl per stage, its last logged steps
        for stage, n in enumerate(steps, 1):
            (run / f"stage{stage}").mkdir(parents=True, exist_ok=True)
            logged = [
                {"step": n - 2, "images_per_s": 700.0 * stage, "rec": 0.4 / stage},
                {"step": n - 1, "images_per_s": 900.0 * stage, "rec": 0.2 / stage},
            ]
            (run / f"stage{stage}/metrics.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in logged)
            )

    for seed, psnr in enumerate((19.0, 20.0, 21.0)):
        report(tmp_path / f"maetok_s{seed}/stage2/eval_raw", psnr, beats=seed)
        report(tmp_path / f"maetok_s{seed}/stage2/eval", psnr - 1)
    report(tmp_path / "lever_recipe/stage2/eval", 18.0)
    report(tmp_path / "lever_recipe/stage2/eval_raw", 18.5)
    report(tmp_path / "lever_1/stage2/eval", 18.25)
    trained(tmp_path / "maetok_s0", 960, 640)
    trained(tmp_path / "lever_recipe", 480, 320)
    done = "checkpoint /x/{}/checkpoint.safetensors (tensors sha256 {})\n"
    (tmp_path / "maetok_s0/recipe.log").write_text(
        done.format("stage1", "aa") + done.format("stage2", "bb")
    )
    (tmp_path / "maetok_s0_repeat").mkdir()
    (tmp_path / "maetok_s0_repeat/recipe.log").write_text(
        done.format("stage1", "aa") + done.format("stage2", "bc")
    )
    trained(tmp_path / "maetok_s0_repeat", 960, 640)  # the same logged values, other rates
    stage2 = tmp_path / "maetok_s0_repeat/stage2/metrics.jsonl"
    logged = [json.loads(x) for x in stage2.read_text().splitlines()]
    logged[1]["loss"] = 0.5  # the repeat's Stage 2 parts at its last logged step
    stage2.write_text("".join(json.dumps({**r, "images_per_s": 1.0}) + "\n" for r in logged))
    (tmp_path / "maetok_s1/recipe.log").write_text(done.format("stage1", "dd"))
    (tmp_path / "maetok_s1_repeat").mkdir()  # a repeat of any seed is checked
    (tmp_path / "maetok_s1_repeat/recipe.log").write_text(done.format("stage1", "dd"))


def test_recipe_table_gives_mean_and_spread_levers_and_the_determinism_check(tmp_path):
    from examples import recipe, recipe_study

    _recipe_study_folder(tmp_path)
    text = recipe_study.table(tmp_path)
    assert text.startswith(f"Study in {tmp_path}: 1600 steps per full run.")
    assert "Levers at 800 steps" in text
    rows = {l.split("|")[1].strip(): l for l in text.splitlines() if l.startswith("| ")}
    s1s2 = rows["MAETok Stage 1 + Stage 2"]
    assert "| 3 | 20.00 ± 1.00 | 0.200 ± 0.010 | 19.00 ± 1.00 |" in s1s2
    assert "0/4, 1/4, 2/4" in s1s2
    assert "MAETok Stage 1" not in rows and "22.07" in rows["thumbnail 37×37 bicubic"]
    first, second = list(recipe.LEVERS)[:2]
    assert "| 18.25 | +0.25 |" in rows[second] and first not in rows
    assert "| 18.50 | +0.50 |" in rows["raw weights instead of EMA (same run)"]
    assert rows["none (the recipe)"] == "| none (the recipe) | 18.00 | – | 0.180 | 0/4 | 800 |"
    assert "- maetok_s0_repeat, stage1: aa and aa: identical; 2 of 2 logged steps equal\n" in text
    assert (
        "- maetok_s0_repeat, stage2: bb and bc: DIFFERENT; 1 of 2 logged steps equal "
        "(the first difference at step 639)"
    ) in text
    assert "- maetok_s1_repeat, stage1: dd and dd: identical" in text
    # the runs: median rate of each stage, digests, the last stage's EMA report
    assert rows["maetok_s0"] == "| maetok_s0 | – | 800 | 1,600 | aa / bb | 18.00 dB / 0.180 |"
    assert rows["maetok_s1_repeat"] == "| maetok_s1_repeat | – | – | – | dd | – |"
    assert (tmp_path / "tables.md").read_text().strip() == text.strip()


def test_recipe_records_give_the_same_tables_as_the_run_folders(tmp_path, capsys):
    import json

    from examples import recipe, recipe_study

    study = tmp_path / "study"
    _recipe_study_folder(study)
    runs = sorted(p for p in study.iterdir() if p.is_dir())
    records = tmp_path / "records"
    assert recipe.main(["record", *map(str, runs), "--into", str(records), "--commit", "abc"]) == 0
    saved = json.loads((records / "maetok_s0.json").read_text())
    assert saved["commit"] == "abc" and saved["stages"]["stage2"]["digest"] == "bb"
    assert saved["stages"]["stage1"]["steps"] == 960 and "per_image" not in str(saved)
    from_folders = recipe_study.table(study).splitlines()
    from_records = recipe_study.table(records).splitlines()
    assert from_records[0] == f"Study in {records}: 1600 steps per full run."
    # each run's row names the commit its record holds; a run folder holds none
    assert "| maetok_s0 | abc | 800 |" in "\n".join(from_records)
    from_records = [line.replace("| abc |", "| – |") for line in from_records]
    differ = [(a, b) for a, b in zip(from_folders[1:], from_records[1:]) if a != b]
    # a record keeps the sha256 of the logged values, not every value: where they differ,
    # it says so without the first step that differs
    assert differ == [
        (
            "- maetok_s0_repeat, stage2: bb and bc: DIFFERENT; 1 of 2 logged steps equal "
            "(the first difference at step 639)",
            "- maetok_s0_repeat, stage2: bb and bc: DIFFERENT; the logged values differ",
        )
    ]
    assert len(from_folders) == len(from_records)
    # the loss curves: each window's mean, Stage 2 drawn after Stage 1
    curve = saved["stages"]["stage2"]["curve"]
    assert curve == {"step": [639], "loss": [None], "rec": [pytest.approx(0.15)]}
    assert recipe_study._joined(saved) == ([959, 960 + 639], pytest.approx([0.3, 0.15]))
    assert (records / "curves.png").stat().st_size > 10_000
    # records and run folders together: the folder's run wins over a record of its name
    mixed = recipe_study.table(study, records).splitlines()
    assert mixed[1:] == from_folders[1:]
    # a record is not overwritten unless asked; a folder with no stage is refused
    with pytest.raises(SystemExit) as stop:
        recipe.main(["record", str(runs[0]), "--into", str(records), "--commit", "abc"])
    assert stop.value.code == 2 and "exists (--force replaces it)" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        recipe.main(["record", str(tmp_path / "empty"), "--into", str(records), "--commit", "x"])
    assert "holds no stage" in capsys.readouterr().err
    (records / "broken.json").write_text("{")  # a cut-off file: one line naming it
    with pytest.raises(SystemExit):
        recipe.main(["table", str(records)])
    assert f"{records / 'broken.json'} is not JSON" in capsys.readouterr().err


def test_recipe_record_curve_is_the_mean_of_each_window_of_logged_steps():
    from examples import recipe_study

    logged = [{"step": i, "loss": float(i), "rec": 2.0 * i} for i in range(120)]
    curve = recipe_study._curve(logged)
    assert curve == {
        "step": [49, 99, 119],
        "loss": [24.5, 74.5, 109.5],
        "rec": [49.0, 149.0, 219.0],
    }


def test_recipe_jobs_cover_seeds_the_repeat_and_every_lever_at_half_budget():
    from examples import recipe, recipe_study

    jobs = recipe_study.jobs(1000)
    names = [j["name"] for j in jobs]
    assert names[:7] == [
        "maetok_s0", "plain_s0", "maetok_s1", "plain_s1", "maetok_s2", "plain_s2",
        "maetok_s0_repeat",
    ]  # fmt: skip
    repeat = jobs[6]
    assert repeat["seed"] == 0 and repeat["env"] == {"MAETOK_JAX_CACHE": "off"}
    again = recipe_study.jobs(1000, seeds=(1, 2), levers=0)[-1]  # the repeat of the first seed
    assert again["name"] == "maetok_s1_repeat" and again["seed"] == 1
    levers = [j for j in jobs if j["name"].startswith("lever_")]
    assert len(levers) == len(recipe.LEVERS) + 1 and {j["steps"] for j in levers} == {500}
    assert [j["name"] for j in recipe_study.jobs(1000, levers=0)] == names[:7]
    quarter = [
        j for j in recipe_study.jobs(14000, lever_share=0.25) if j["name"].startswith("lever_")
    ]
    assert {j["steps"] for j in quarter} == {3500}
    # lever runs evaluate only what the lever table reads; the seed runs every report
    assert quarter[0]["evals"] == ["stage2/eval", "stage2/eval_raw"]  # the recipe: the EMA row
    assert all(j["evals"] == ["stage2/eval"] for j in quarter[1:])
    assert not any("evals" in j for j in jobs[:7])
    assert "loss.gamma" not in recipe.plain(recipe.RECIPE)
    assert recipe.plain(recipe.RECIPE)["model.aux_targets"] == []


def _run(args, cwd, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env_extra or {}))
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_marble_example_trains_one_iteration_per_step_of_a_real_walk(tmp_path):
    saved = tmp_path / "tok.safetensors"
    run = _run(
        [
            str(ROOT / "examples" / "marble_maetok.py"),
            "--host",
            "test",
            "--walks",
            "3",
            "--steps",
            "4",
            "--neurons",
            "3",
            "--stage2-start",
            "6",
            "--save",
            str(saved),
        ],
        tmp_path,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    walks = re.findall(
        r"^walk \d+: (\d+) steps( \+ dead end)? -> (\d+) tokenizer iterations",
        run.stdout,
        re.MULTILINE,
    )
    assert [(int(s), d, int(i)) for s, d, i in walks] == [(4, "", 4)] * 3
    assert "3 walks: 12 steps, 12 tokenizer iterations\n" in run.stdout
    assert "errors: 0" in run.stdout and "(stage 2, iteration 16)" in run.stdout  # 4 pretraining
    assert saved.exists()
    assert "walk:" not in run.stderr and "\r" not in run.stderr  # the host's bars are off

    # The host does draw its bar when nothing switches it off.
    walk = (
        "from tests import marble_host as h; b = h.chain_brain(4); "
        "h.Wanderer(b).walk(start=h.chain_start(b))"
    )
    bar = _run(["-c", walk], ROOT)
    assert bar.returncode == 0 and "walk:" in bar.stderr


def test_marble_example_flags_walks_that_take_no_step(monkeypatch, capsys):
    monkeypatch.setenv("TQDM_DISABLE", "1")  # what the example would set, undone after
    from examples import marble_maetok as example

    def backwards(marblemain, neurons):  # each synapse from the new neuron back to the last
        brain = marblemain.Brain(2, size=example.BRAIN_SIZE)
        chain = brain.available_indices()[:neurons]
        brain.add_neuron(chain[0], tensor=[0.1])
        for prev, idx in itertools.pairwise(chain):
            brain.add_neuron(idx, tensor=[0.2], connect_to=prev, direction="uni")
        return brain, chain

    monkeypatch.setattr(example, "build_brain", backwards)
    assert example.main(["--host", "test", "--walks", "2", "--neurons", "3"]) == 1
    out = capsys.readouterr().out
    assert out.count("0 steps + dead end -> 1 tokenizer iterations") == 2
    assert "the walk took no step" in out and "2 walks: 0 steps, 2 tokenizer iterations" in out


def test_the_readme_marble_snippet_runs_under_the_strict_host(tmp_path, monkeypatch, rng):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Using MAETok inside Marble") :]
    start = section.index("```python\n") + len("```python\n")
    code = section[start : section.index("\n```", start)]
    photos = tmp_path / "path" / "to" / "photos"
    photos.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    with host.installed():
        ns = {}
        exec(compile(code, "README.md", "exec"), ns)  # the README's own code
    tok, stats = ns["tok"], ns["stats"]
    assert tok.last_error is None and len(ns["brain"].neurons) == 6
    assert stats["steps"] == 20 and tok.iteration == 20
    assert (tmp_path / "runs" / "marble" / "checkpoint.safetensors").exists()


def _study(out: Path, rng) -> dict:
    """A finished study's files: tokenizer reports, two seeds of sample reports and grids."""
    fd = {}
    for t in ("plain_ae", "maetok_s1", "maetok_s2"):
        tok = out / "tokenizers" / t
        tok.mkdir(parents=True)
        report = {
            "psnr": float(rng.uniform(20, 25)),
            "linear_probe": float(rng.uniform(0.3, 0.6)),
            "gmm_nll": {"1": 0.3, "4": 0.2, "16": 0.1, "32": 0.05},
            "latent_shape": [16, 8],
        }
        (tok / "metrics.json").write_text(json.dumps({"tokenizers": {str(tok): report}}))
        for s in (0, 1):
            run = out / "diffusion" / f"{t}_seed{s}"
            run.mkdir(parents=True)
            for g in ("1.0", "1.5"):
                fd[t, s, g] = float(rng.uniform(50, 120))
                sample = {
                    "fd_c10": fd[t, s, g],
                    "precision": 0.5,
                    "recall": 0.25,
                    "class_consistency": 0.4,
                }
                (run / f"eval_g{g}.json").write_text(json.dumps({"samples": sample}))
                Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(
                    run / f"grid_g{g}.png"
                )
    return fd


def test_diffusability_table_gives_mean_and_half_range_over_seeds(tmp_path, rng):
    from examples.diffusability_table import main as table_main

    fd = _study(tmp_path / "c10", rng)
    figure = tmp_path / "fig.png"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "diffusability_table.py"),
            str(tmp_path / "c10"),
            "--guidance",
            "1.5",
            "--figure",
            str(figure),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {
        line.split(" | ")[0].lstrip("| "): line
        for line in proc.stdout.splitlines()
        if line.startswith("| ") and "tokenizer" not in line
    }
    assert set(rows) == {"plain AE", "MAETok Stage 1", "MAETok Stage 1 + 2"}
    for name, title in (("plain_ae", "plain AE"), ("maetok_s2", "MAETok Stage 1 + 2")):
        for g in ("1.0", "1.5"):
            a, b = fd[name, 0, g], fd[name, 1, g]
            assert f"{(a + b) / 2:.2f} ± {abs(a - b) / 2:.2f}" in rows[title]
    assert Image.open(figure).size == (3 * 60 + 2 * 12, 40 + 18)  # three panels side by side
    assert table_main([str(tmp_path / "nothing")]) == 2
    # two studies in one table: each row names its folder, in the folders' order
    from examples.diffusability_table import table

    _study(tmp_path / "c10_recipe", rng)
    both = table([tmp_path / "c10", tmp_path / "c10_recipe"], "1.5").splitlines()[2:]
    assert [line.split(" | ")[0] for line in both] == [
        f"| {folder}: {title}"
        for folder in ("c10", "c10_recipe")
        for title in ("plain AE", "MAETok Stage 1", "MAETok Stage 1 + 2")
    ]
    assert table_main([str(tmp_path / "c10"), str(tmp_path / "nothing")]) == 2


def test_study_script_is_valid_bash_and_names_every_phase(tmp_path):
    script = ROOT / "examples" / "cifar10_diffusability.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    proc = subprocess.run(
        ["bash", str(script), "nosuchphase"],
        capture_output=True,
        text=True,
        env={**os.environ, "OUT": str(tmp_path / "study")},
    )
    assert proc.returncode == 2
    for phase in (
        "prepare",
        "classifier",
        "tokenizers",
        "tokmetrics",
        "diffusion",
        "sample",
        "eval",
        "table",
    ):
        assert phase in proc.stdout


def test_recipe_study_runs_only_the_named_jobs_and_refuses_unknown_ones(tmp_path, capsys):
    from examples import recipe, recipe_study

    args = argparse.Namespace(seeds=(0, 1, 2), levers=None, lever_share=0.25, only=None)
    assert len(recipe_study.selected(14000, args)) == 7 + 1 + len(recipe.LEVERS)
    args.only = ["lever_recipe", "lever_1"]
    picked = recipe_study.selected(14000, args)
    assert [j["name"] for j in picked] == ["lever_recipe", "lever_1"]
    assert picked[1]["changes"] == list(recipe.LEVERS.values())[1] and picked[1]["steps"] == 3500

    with pytest.raises(SystemExit) as stop:
        recipe.main(["study", str(tmp_path / "study"), "--only", "lever_recipe,lever_99"])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith("recipe: error: --only: no job lever_99")
    assert len(err.splitlines()) == 1 and not (tmp_path / "study").exists()


def test_recipe_study_writes_each_finished_runs_record(tmp_path, monkeypatch, capsys):
    from examples import recipe, recipe_study

    class Done:  # a run that has ended: well (0) or not
        def __init__(self, code):
            self.returncode = code

        def poll(self):
            return self.returncode

    def launch(job, folder, args, steps_only=None):  # leaves a run folder as `recipe.py run`
        made = tmp_path / f"made_{job['name']}"
        _recipe_study_folder(made)
        folder.mkdir(parents=True, exist_ok=True)
        (made / "lever_recipe").rename(folder / job["name"])
        log = open(tmp_path / f"{job['name']}.out", "w")  # noqa: SIM115 - closed by _pool
        return Done(1 if job["name"] == "lever_1" else 0), log

    monkeypatch.setattr(recipe_study, "_launch", launch)
    monkeypatch.setattr(recipe_study.time, "sleep", lambda s: None)
    study, records, data = tmp_path / "study", tmp_path / "records", tmp_path / "data"
    (data / "photos").mkdir(parents=True)
    (data / "bsds500/train").mkdir(parents=True)
    argv = ["study", str(study), "--steps", "1600", "--data", str(data)]
    argv += ["--only", "lever_recipe,lever_0,lever_1"]
    with pytest.raises(SystemExit):
        recipe.main([*argv, "--records", str(records)])
    assert "--records needs --commit" in capsys.readouterr().err and not study.exists()
    assert recipe.main([*argv, "--records", str(records), "--commit", "abc", "--jobs", "1"]) == 0
    # the runs that ended well have their records; the failed one has none
    assert sorted(p.name for p in records.iterdir()) == ["lever_0.json", "lever_recipe.json"]
    saved = json.loads((records / "lever_0.json").read_text())
    assert saved["commit"] == "abc" and saved["stages"]["stage2"]["reports"]["eval"]
    assert "lever_1 failed (exit 1)" in capsys.readouterr().out


def test_recipe_run_passes_its_report_list_on(tmp_path, monkeypatch):
    from examples import recipe

    calls = []
    monkeypatch.setattr(recipe, "run_one", lambda *a, **k: calls.append(k))
    train = tmp_path / "train"
    base = ["run", str(tmp_path / "r"), "--train", str(train), "--steps", "8"]
    assert recipe.main([*base, "--evals", "stage2/eval,stage2/eval_raw"]) == 0
    assert recipe.main(base) == 0
    assert [c["evals"] for c in calls] == [["stage2/eval", "stage2/eval_raw"], None]


def test_recipe_evals_lists_what_is_missing_and_stops_with_one_line(tmp_path, capsys):
    import numpy as np

    from examples import recipe
    from maetok.checkpoint import save_checkpoint
    from maetok.config import preset

    def stage(folder, done, steps):  # a checkpoint saved at step ``done`` of ``steps``
        folder.mkdir(parents=True)
        save_checkpoint(folder / "checkpoint.safetensors", {"w": np.ones(2)}, preset("tiny"),
                        {"step": done})  # fmt: skip
        (folder / "config.json").write_text(json.dumps({"train": {"steps": steps}}))

    run = tmp_path / "maetok_s0"
    stage(run / "stage1", 6, 6)
    stage(run / "stage2", 4, 4)
    stage(run / "stage3", 2, 4)  # cut off: reported once it is done
    (run / "stage1/eval").mkdir()
    (run / "stage1/eval/eval.json").write_text("{}")  # written already: not again
    pending = [(c.parent.name, ema, r.name) for c, ema, r in recipe.pending_evals(run)]
    assert pending == [
        ("stage1", False, "eval_raw"), ("stage2", True, "eval"), ("stage2", False, "eval_raw"),
    ]  # fmt: skip
    only = recipe.pending_evals(run, ["stage2/eval", "stage1/eval"])
    assert [(c.parent.name, r.name) for c, _, r in only] == [("stage2", "eval")]
    stage(tmp_path / "cut/stage1", 3, 6)
    for argv, says in (
        (["evals", str(tmp_path / "nothing")], "holds no finished stage"),
        (["evals", str(tmp_path / "cut")], "holds no finished stage"),
        (["evals", str(run), "--val", str(tmp_path / "no_val")], "no report folder"),
    ):
        with pytest.raises(SystemExit) as stop:
            recipe.main(argv)
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and err.startswith("recipe: error: ") and says in err
        assert len(err.splitlines()) == 1
    assert not (run / "stage2/eval").exists()

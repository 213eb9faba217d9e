"""The speed benchmark runs on CPU with the tiny preset; its FLOP count is the documented one."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.train_step import transformer_flops
from maetok.config import preset

ROOT = Path(__file__).resolve().parents[1]


def test_flop_formula_matches_hand_count_for_base():
    m = preset("base").model
    n = m.num_patches + m.num_latent_tokens  # 384 tokens in every stack

    def blocks(depth, d):  # forward FLOPs of a block stack: (24·D² + 4·n·D) per token
        return depth * n * (24 * d * d + 4 * n * d)

    stacks = blocks(12, 768) + blocks(12, 768) + 3 * blocks(3, 192)
    flops = transformer_flops(m, stage=1)
    # The embeddings and heads add under 1 %; the blocks are the count.
    assert 3 * stacks < flops["train_step"] < 1.01 * 3 * stacks
    assert abs(flops["train_step"] / 1e9 - 438.3) < 0.1
    s2 = transformer_flops(m, stage=2)["train_step"]
    assert 1.5 < flops["train_step"] / s2 < 1.6  # Stage 2: encoder forward only, no aux


def test_train_step_benchmark_runs_on_cpu_for_both_backends(tmp_path):
    out = tmp_path / "bench.jsonl"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "train_step.py"),
        "--preset",
        "tiny",
        "--backends",
        "jax,torch",
        "--batch",
        "4",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--json",
        str(out),
        "--timeout",
        "300",
        "--deterministic",  # asked of each framework before it starts, as `maetok train` does
        "--xla-flags=--xla_gpu_triton_gemm_any=true",  # a GPU flag: parsed, unused on the CPU
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "img/s" in proc.stdout and "TFLOP/s" in proc.stdout
    assert "deterministic kernels" in proc.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["backend"] for r in rows] == ["jax", "torch"]
    assert rows[0]["xla_flags"] == "--xla_gpu_triton_gemm_any=true"
    for r in rows:
        assert r["images_per_s"] > 0 and r["step_ms_median"] > 0
        # img/s is the pipelined window's, the synced median kept beside it
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["step_ms"] * 1e3)
        assert r["images_per_s_synced"] == pytest.approx(r["batch"] / r["step_ms_median"] * 1e3)
        assert math.isfinite(r["final_loss"])
        assert r["batch"] == 4 and r["preset"] == "tiny" and r["deterministic"] is True
    # Same initial parameters, batches and masks: the two backends end on the same loss.
    assert abs(rows[0]["final_loss"] - rows[1]["final_loss"]) < 1e-3 * abs(rows[0]["final_loss"])


def test_breakdown_times_every_part_on_cpu(tmp_path, capsys):
    from benchmarks import trace_summary

    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "breakdown.py"),
        "--preset",
        "tiny",
        "--batch",
        "2",
        "--runs",
        "1",
        "--trace",
        str(tmp_path / "trace"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for part in (
        "encoder forward",
        "pixel decoder",
        "aux decoders",
        "targets",
        "perceptual",
        "optimiser",
        "whole Stage-1 step",
        "whole Stage-2 step",
    ):
        line = next((x for x in proc.stdout.splitlines() if x.startswith(part)), None)
        assert line is not None, f"no {part!r} row in:\n{proc.stdout}"
        assert float(line.split(" ms")[0].split()[-1]) > 0
    # each whole step by XLA's cost model: bytes moved and their time at the bandwidth
    costs = [x for x in proc.stdout.splitlines() if x.startswith("  cost model: ")]
    assert len(costs) == 2
    for line in costs:
        moved = float(line.split("cost model: ")[1].split(" GB")[0])
        memory_ms = float(line.split("a step, ")[1].split(" ms")[0])
        assert moved > 0 and abs(memory_ms - moved / 4.8) < 0.051 + 0.01 * memory_ms
    # the trace of the Stage-1 step, split by the step's named scopes
    assert trace_summary.main([str(tmp_path / "trace")]) == 0
    out = capsys.readouterr().out
    by_part = out.split("by part of the step")[1].split("by kernel family")[0]
    ms = {l.split()[0]: float(l.split()[1]) for l in by_part.splitlines()[1:] if l.strip()}
    assert {"encoder", "decoder", "aux_decoders", "perceptual", "optimiser"} <= set(ms)
    assert all(v > 0 for v in ms.values())
    # nearly every instruction of the step has a part (a bound on instructions, not on time:
    # on a busy CPU the unnamed copies XLA adds take a share of the time that varies widely)
    hlo = (tmp_path / "trace" / trace_summary.HLO_NAME).read_text()
    named = [trace_summary.part(op) for op in trace_summary.op_names(hlo).values()]
    assert sum(part != "other" for part in named) > 0.75 * len(named)
    # the top kernels with the bytes their instructions move and the bandwidth: ms a call
    # × TB/s is the GB a call (to the printed digits)
    call = re.compile(r"×\d+\s+([\d.]+) ms\s+([\d.e+-]+) GB\s+([\d.e+-]+) TB/s")
    top = [m.groups() for m in map(call.search, out.split("top 25 kernels")[1].splitlines()) if m]
    assert len(top) >= 10
    for ms_call, gb, tbps in (map(float, t) for t in top):
        # each printed to 3 significant digits, ms to 3 decimals (±5e-4 ms, i.e. ±5e-4·TB/s GB)
        assert gb > 0 and abs(ms_call * tbps - gb) <= 0.011 * gb + 5e-4 * tbps


def test_trace_summary_counts_the_bytes_an_instruction_moves():
    """Operands read once (a tuple operand's named element), the result written once, and
    the 8-bit scratch of a cuBLAS call left out."""
    from benchmarks.trace_summary import instruction_bytes

    hlo = """
ENTRY %main (p0: bf16[4,8], p1: f32[8]) -> f32[4,8] {
  %p0 = bf16[4,8]{1,0} parameter(0), metadata={op_name="x"}
  %p1 = f32[8]{0} parameter(1)
  %mm = (bf16[4,8]{1,0}, s8[1024]{0}) custom-call(%p0, %p0), custom_call_target="__cublas$lt$matmul"
  %fusion.1 = (f32[4]{0}, f32[4,8]{1,0}) fusion(%mm#0, %p1), kind=kInput, calls=%fused
  ROOT %add = f32[4,8]{1,0} add(%fusion.1#1, %fusion.1#1)
}
"""
    moved = instruction_bytes(hlo)
    assert moved["p0"] == 64 and moved["p1"] == 32  # written only
    assert moved["mm"] == 2 * 64 + 64  # two bf16 (4, 8) reads, one write; not the s8 scratch
    assert moved["fusion.1"] == (64 + 32) + (16 + 128)  # mm's first element and p1; two results
    assert moved["add"] == 2 * 128 + 128


def test_trace_summary_names_the_kernel_family_of_h200_kernels():
    """Kernel names from an H200 trace: cuDNN convolutions also say "cudnn" or "gemm", and
    XLA's convert fusions say "conv"; each must land in its own family."""
    from benchmarks.trace_summary import family

    names = {
        "void precomputed_convolve_sgemm<__nv_bfloat16, 1024, 5, 5, 4>": "convolution",
        "void cudnn::cnn::conv2d_grouped_direct_kernel<false, true>": "convolution",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16": "attention (cuDNN flash)",
        "nvjet_sm90_tst_128x160_64x5_2x1_v_bz_TNT": "matmul (cuBLAS/cutlass gemm)",
        "gemm_fusion_dot_117": "matmul (XLA's Triton gemm fusions)",
        "input_convert_reduce_fusion_1": "reduction fusion",
        "loop_convert_fusion_8": "elementwise/loop fusion",
        "MemcpyD2D": "transpose/copy",
    }
    assert {n: family(n) for n in names} == names


def test_trace_summary_splits_gpu_kernels_by_part_and_counts_cuda_graphs_apart(tmp_path, capsys):
    """A GPU trace: kernels name their HLO instruction, whose op name gives the part; a kernel
    replayed from a CUDA graph names only the graph and is counted apart, not as a part."""
    import gzip
    import json

    from benchmarks import trace_summary

    hlo = (
        '  %fusion.1 = bf16[8] fusion(), metadata={op_name="jit(step)/encoder/dot_general"}\n'
        '  %fusion.2 = f32[8] fusion(), metadata={op_name="jit(step)/transpose(perceptual)/mul"}\n'
    )
    kernel = {"ph": "X", "pid": 1, "ts": 0}
    events = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {**kernel, "name": "nvjet_gemm", "dur": 30, "args": {"hlo_op": "fusion.1"}},
        {**kernel, "name": "loop_fusion", "dur": 10, "args": {"hlo_op": "fusion.2"}},
        {**kernel, "name": "nvjet_gemm", "dur": 60, "args": {"hlo_op": "command_buffer_3"}},
    ]
    (tmp_path / trace_summary.HLO_NAME).write_text(hlo)
    with gzip.open(tmp_path / "x.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    assert trace_summary.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    shares = {
        line[:34].strip(): line.split()[-1]
        for line in out.splitlines()
        if line.endswith("%") and not line.startswith(" ")
    }
    assert shares["encoder"] == "30.0%" and shares["perceptual"] == "10.0%"
    assert shares["(in a CUDA graph)"] == "60.0%"
    # each top kernel's line is followed by where it runs: its instruction's op name
    lines = out.split("top 25 kernels")[1].splitlines()
    at = {l.split()[-1]: lines[i + 1].strip() for i, l in enumerate(lines) if "% ×" in l}
    assert at == {
        "nvjet_gemm": "in encoder/dot_general",
        "loop_fusion": "in transpose(perceptual)/mul",
    }


def test_train_step_benchmark_reports_scaling_over_torch_processes(tmp_path):
    out = tmp_path / "bench.jsonl"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "train_step.py"),
        "--preset",
        "tiny",
        "--backends",
        "torch",
        "--batch",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--devices",
        "plain,2",
        "--json",
        str(out),
        "--timeout",
        "300",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "img/s/dev" in proc.stdout and "eff" in proc.stdout
    plain, two = [json.loads(line) for line in out.read_text().splitlines()]
    assert plain["devices"] is None and two["devices"] == 2
    assert (plain["global_batch"], two["global_batch"]) == (2, 4)  # --batch is per device
    assert (
        abs(two["images_per_s_per_device"] * 2 - two["images_per_s"]) < 1e-6 * two["images_per_s"]
    )
    assert plain["scaling_efficiency"] == 1.0
    assert (
        abs(
            two["scaling_efficiency"]
            - two["images_per_s_per_device"] / plain["images_per_s_per_device"]
        )
        < 1e-9
    )


def test_levers_table_gives_ratios_to_the_ceiling_and_the_official_step():
    from benchmarks.levers import ROWS, table

    row = {"batch": 256, "images_per_s": 540.0, "model_tflops": 395.0, "peak_memory_gib": 40.0}
    text = table(
        [
            ("JAX S1, all levers", {**row, "compile_s": 41.0, "sm_clock_mhz": 1612.5}),
            ("torch", {"batch": 128, "error": "OOM"}),
            ("no clock", {**row, "compile_s": 5.0}),
        ],
        ceiling=790.0,
        reference=270.0,
    )
    lines = text.splitlines()
    assert lines[2] == (
        "| JAX S1, all levers | 256 | 540.0 | 395.0 | 50.0 % | 2.00 | 40.0 | 41.0 | 1612 |"
    )
    assert lines[3].startswith("| torch | 128 | OOM |")
    assert lines[4].endswith("| 5.0 | – |")  # a CPU row: no clock sampled
    # both stages of both backends and the seed preset are rows of the one command
    labels = [label for label, *_ in ROWS]
    assert {"JAX S2, all levers", "torch eager S2", "torch.compile S2 (block)"} <= set(labels)
    seed = [(label, backend, extra) for label, backend, _, extra in ROWS if "seed" in label]
    assert {backend for _, backend, _ in seed} == {"jax", "torch"}
    assert any("--unroll" in extra for *_, extra in seed)  # the recipe's model, scans unrolled


def test_clock_summary_takes_medians_and_skips_what_nvidia_smi_cannot_read():
    from benchmarks.clocks import ClockMonitor, parse

    lines = [
        "1980, 350.5, 1980, 700.00",
        "1500, 699.0, 1980, 700.00",
        "1620, 690.0, 1980, 700.00",
        "[N/A], [N/A], 1980, 700.00",  # a field the driver could not read
        "",
    ]
    s = parse(lines)
    assert s["sm_clock_mhz"] == 1620 and s["power_w"] == 690.0
    assert (s["sm_clock_max_mhz"], s["power_limit_w"], s["clock_samples"]) == (1980, 700, 3)
    assert parse(["[N/A], [N/A], [N/A], [N/A]"]) == {}
    with ClockMonitor() as clocks:  # no GPU here: nothing sampled, nothing reported
        pass
    assert clocks.summary() == {} or clocks.summary()["clock_samples"] >= 1


def test_train_step_table_shows_the_clock_and_the_sustained_ceiling(capsys):
    from benchmarks.train_step import print_table

    row = dict(
        backend="jax", preset="base", stage=1, dtype="bfloat16", batch=256, gan=False,
        attention="fused", data="in-memory synthetic", model_gflop_per_image=438.3,
        conv_gflop_per_image=1.46, images_per_s=873.2, step_ms=293.2, model_tflops=382.8,
        peak_memory_gib=67.2, first_step_s=38.0, compile_s=37.7, final_loss=3.2862,
        matmul_ceiling_tflops=662.0,
    )  # fmt: skip
    clocked = dict(
        sm_clock_mhz=1665.0, power_w=694.0, sm_clock_max_mhz=1980.0, power_limit_w=700.0,
        matmul_sustained_tflops=685.0, matmul_sm_clock_mhz=1500.0, matmul_power_w=692.0,
    )  # fmt: skip
    print_table([{**row, **clocked}])
    out = capsys.readouterr().out
    assert out.splitlines()[5].split()[-2:] == ["1665", "694"]
    assert "662 TFLOP/s, 685 for 3 s back to back at 1500 MHz, 692 W" in out
    assert "maximum clock 1980 MHz, power limit 700 W" in out
    print_table([row])  # a row without nvidia-smi: dashes, no clock line
    out = capsys.readouterr().out
    assert out.splitlines()[5].split()[-2:] == ["-", "-"] and "power limit" not in out


def test_levers_times_the_latent_diffusion_step_as_a_row_of_its_table():
    from benchmarks.levers import ROWS, run_diffusion, table

    argv = ["--preset", "tiny", "--tokens", "16", "--token-dim", "8", "--steps", "2"]
    row = run_diffusion([*argv, "--dtype", "float32", "--batch", "8"], timeout=300)
    assert "error" not in row, row
    assert row["batch"] == 8 and row["images_per_s"] > 0 and row["model_tflops"] > 0
    assert row["compile_s"] > 0 and math.isfinite(row["diffusion"]["loss"])
    line = table([("DiT", row)], ceiling=790.0, reference=270.0).splitlines()[2]
    assert line.split("|")[6].strip() == "–"  # samples of a DiT are not the tokenizer's images
    assert any(backend == "jax-diffusion" for _, backend, *_ in ROWS)


def test_an_xla_flag_reaches_the_timed_subprocess():
    """An unknown flag stops XLA as it starts: the row fails, so the flags were read there."""
    from benchmarks.train_step import _run_backend

    argv = ["--preset", "tiny", "--warmup", "1", "--steps", "1"]
    row = _run_backend("jax", 2, [*argv, "--xla-flags=--xla_no_such_flag=true"], timeout=120)
    assert "error" in row


def test_levers_xla_flag_rows_are_flags_this_xla_knows():
    """Each XLA-flag row is its own group, and XLA starts with every flag of them (an unknown
    flag would stop it: a typo shows here, not on the GPU)."""
    from benchmarks.levers import ROWS, XLA_FLAG_ROWS, row_group

    groups = {label: row_group(backend, extra) for label, backend, _, extra in ROWS}
    assert sum(g == "flags" for g in groups.values()) == len(XLA_FLAG_ROWS)
    assert groups["torch.compile S1 (parts)"] == "torch"
    assert groups["DiT small (latent diffusion), fused attention"] == "jax"
    env = {**os.environ, "XLA_FLAGS": " ".join(XLA_FLAG_ROWS.values())}
    code = "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "3.0", proc.stderr[-500:]


def test_levers_match_selects_rows_by_label_within_a_group(capsys):
    """``--match`` keeps the rows whose label the expression finds, inside ``--rows``; a
    selection of nothing or a bad expression stops with one line before any row runs."""
    from benchmarks.levers import MAIN, ROWS, main, selected

    flash = selected(ROWS, "all", "flash|parts")
    assert [r[0] for r in flash] == [
        "JAX S1, unroll 12, flash attention",
        "JAX S1 seed preset, unroll 12, flash attention",
        "torch.compile S1 (parts)",
        "torch.compile S2 (parts)",
    ]
    assert [r[0] for r in selected(ROWS, "torch", "S1.*(flash|parts)")] == [
        "torch.compile S1 (parts)"
    ]
    assert selected(ROWS, "all") == ROWS
    # the README's table: each of its labels is exactly one row
    assert sorted(r[0] for r in selected(ROWS, "main")) == sorted(MAIN)
    bad = (["--match", "no such row"], ["--rows", "flags", "--match", "parts"], ["--match", "("])
    for argv in bad:
        with pytest.raises(SystemExit) as e:
            main(["--out", "unused.md", *argv])
        assert e.value.code == 2
        assert "--match" in capsys.readouterr().err


def test_levers_parts_cover_the_rows_once_and_merge_into_one_table(tmp_path, capsys):
    """``--part K/N`` splits the selected rows into N disjoint runs that cover them all;
    ``--from-json`` renders the rows those runs appended as one table, in ``ROWS`` order,
    a label run twice keeping its last row; a bad part stops with one line."""
    from benchmarks.levers import ROWS, main, part

    parts = [part(ROWS, f"{k}/3") for k in (1, 2, 3)]
    assert sorted(r[0] + str(r[2]) for p in parts for r in p) == sorted(
        r[0] + str(r[2]) for r in ROWS
    )
    assert all(abs(len(p) - len(ROWS) / 3) < 1 for p in parts)
    assert sum("torch.compile" in r[0] for r in parts[0]) < sum(
        "torch.compile" in r[0] for r in ROWS
    )

    def row(label, ips):
        res = {"batch": 256, "images_per_s": ips, "model_tflops": 300.0, "peak_memory_gib": 40.0}
        return json.dumps({"label": label, **res, "compile_s": 20.0})

    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text(row("torch eager S1", 300.0) + "\n" + row("JAX S1, unroll 12", 600.0) + "\n")
    second.write_text(row("JAX S1, unroll 12", 690.0) + "\n" + row("not a row of ROWS", 1.0) + "\n")
    out = tmp_path / "t.md"
    assert main(["--out", str(out), "--from-json", str(first), str(second)]) == 0
    lines = out.read_text().splitlines()[2:5]
    assert [line.split(" | ")[0][2:] for line in lines] == [
        "JAX S1, unroll 12",
        "torch eager S1",
        "not a row of ROWS",
    ]
    assert lines[0].split(" | ")[2] == "690.0"
    capsys.readouterr()
    for bad in (["--part", "4/3"], ["--part", "half"], ["--from-json", str(tmp_path / "none")]):
        with pytest.raises(SystemExit) as e:
            main(["--out", str(out), *bad])
        assert e.value.code == 2
        assert bad[0] in capsys.readouterr().err


def test_mlp_epilogue_kernel_matches_the_model_and_prints_its_rows(capsys):
    """The fused fc1 + bias + erf GELU kernel (in Pallas' interpreter here) gives the model's
    pre-activation and GELU to bf16 rounding, and the benchmark prints a row per variant."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import mlp_epilogue

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 128)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((128, 64)) / 11.3, jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal(64), jnp.bfloat16)
    h, a = mlp_epilogue.pallas_fc1_gelu(x, w, b, bm=32, bn=32, bk=64, warps=4, stages=3)
    raw, want = jax.jit(mlp_epilogue.xla_fc1_gelu)(x, w, b)
    exact = np.asarray(x, np.float32) @ np.asarray(w, np.float32) + np.asarray(b, np.float32)
    f32 = lambda t: np.asarray(t, np.float32)
    assert np.abs(exact).max() > 1 and np.abs(f32(a) - f32(h)).max() > 0.1  # the GELU acts
    np.testing.assert_allclose(f32(h), exact, rtol=2**-7, atol=2**-7)  # one rounding
    np.testing.assert_allclose(f32(a), f32(want), rtol=2**-6, atol=2**-6)
    np.testing.assert_allclose(f32(raw), exact - f32(b), rtol=2**-7, atol=2**-7)
    with pytest.raises(ValueError, match="do not divide"):
        mlp_epilogue.pallas_fc1_gelu(x, w, b, bm=48, bn=32, bk=64, warps=4, stages=3)
    # backward: dy @ w2ᵀ times GELU'(h), and fc1's bias gradient from the row blocks' sums
    w2 = jnp.asarray(rng.standard_normal((64, 128)) / 8, jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((64, 128)), jnp.bfloat16)
    dh, db = mlp_epilogue.pallas_fc2_grad_gelu(dy, w2, h, bm=32, bn=32, bk=64, warps=4, stages=3)
    want_dh, want_db = jax.jit(mlp_epilogue.xla_fc2_grad_gelu)(dy, w2, raw, b)
    assert dh.shape == (64, 64) and db.shape == (64,) and np.abs(f32(want_db)).max() > 1
    np.testing.assert_allclose(f32(dh), f32(want_dh), rtol=2**-6, atol=2**-6)
    np.testing.assert_allclose(f32(db), f32(want_db), rtol=2**-5, atol=2**-5)
    argv = ["--rows", "128", "--width", "64", "--hidden", "256", "--runs", "1"]
    assert mlp_epilogue.main(argv) == 0
    out = capsys.readouterr().out
    names = [line.split("  ")[0] for line in out.splitlines()[2:]]
    assert names[:2] == ["xla", "xla matmul only"] and names[2].startswith("pallas 64×128×64")
    # the first Mosaic tiling fits (the interpreter stops there), then its matmul alone
    assert names[3] == "mosaic 128×128×64 s3 n e64" and names[4] == f"{names[3]} matmul only"
    assert names[5:7] == ["bwd xla", "bwd xla matmul only"] and names[7].startswith("bwd pallas")
    assert names[8] == "bwd mosaic 128×128×64 s3 n e64" and len(names) == 9
    assert mlp_epilogue.main([*argv, "--kernels", "mosaic"]) == 0
    names = [line.split("  ")[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert [n.removeprefix("bwd ").split()[0] for n in names if "×" in n] == ["mosaic"] * 3


@pytest.mark.parametrize("split", ["m", "n", "pp"])
def test_mosaic_mlp_kernels_match_the_model(split):
    """The Mosaic GPU (wgmma) fc1 + bias + GELU kernel and its backward, in Mosaic GPU's
    interpreter here, a block's two warpgroups on stacked or side-by-side halves of a tile or
    taking whole tiles in turn (ping-pong), the epilogue in two column chunks: the model's
    pre-activation and GELU, dh and fc1's bias gradient, to the last bf16 bit but for the few
    elements where another order of the K sum or the rational erf rounds the other way."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import mlp_epilogue
    from maetok_jax.layers import dense, gelu

    rng = np.random.default_rng(1)
    f32 = lambda t: np.asarray(t, np.float32)
    x = jnp.asarray(rng.standard_normal((256, 128)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((128, 128)) / 11.3, jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal(128), jnp.bfloat16)
    # 64 × 64 halves or tiles, 2 K steps each; the interpreter's two blocks walk two or
    # more tiles each, so each reuses its buffers and barriers
    cfg = dict(tm=64, tn=64, tk=64, steps=2, split=split, ep=32, approx=False)
    pre, h = mlp_epilogue.mosaic_fc1_gelu(x, w, b, **cfg)
    want_pre = dense({"w": w, "b": b}, x)
    assert (f32(pre) == f32(want_pre)).mean() > 0.99  # K summed in another order: a few roundings
    np.testing.assert_allclose(f32(pre), f32(want_pre), rtol=2**-7, atol=2**-7)
    want_h = gelu(pre, lowp=True)  # the epilogue, on the kernel's own pre-activation
    assert np.abs(f32(h) - f32(pre)).max() > 0.1  # the GELU acts
    assert (f32(h) == f32(want_h)).mean() > 0.99
    np.testing.assert_allclose(f32(h), f32(want_h), rtol=2**-7, atol=1e-5)
    with pytest.raises(ValueError, match="do not divide"):
        mlp_epilogue.mosaic_fc1_gelu(x, w, b, **{**cfg, "tm": 48})
    w2 = jnp.asarray(rng.standard_normal((128, 128)) / 16, jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((256, 128)), jnp.bfloat16)
    dh, db = mlp_epilogue.mosaic_fc2_grad_gelu(dy, w2, pre, **cfg)
    (want_dh,) = jax.vjp(lambda t: gelu(t, lowp=True), pre)[1](dy @ w2.T)
    want_db = jnp.sum(want_dh.astype(jnp.float32), axis=0)
    assert dh.shape == (256, 128) and db.shape == (128,) and np.abs(f32(want_db)).max() > 1
    assert (f32(dh) == f32(want_dh)).mean() > 0.99
    np.testing.assert_allclose(f32(dh), f32(want_dh), rtol=2**-7, atol=1e-5)
    np.testing.assert_allclose(f32(db), f32(want_db), rtol=1e-3, atol=1e-3)

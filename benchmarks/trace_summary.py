"""Summarise a JAX profiler trace (the Perfetto JSON written by ``breakdown.py --trace``):
GPU time per part of the step and per kernel family, largest first.

    python benchmarks/trace_summary.py TRACE_DIR [--top 25]

The parts are the step's ``jax.named_scope`` names (encoder, decoder, aux_decoders, targets,
perceptual, mask_loss, optimiser): each kernel event names the HLO instruction it runs
(``hlo_op``), and the compiled step's HLO (``TRACE_DIR/step.hlo.txt``, written beside the
trace) gives that instruction's op name, whose outermost scope is its part; the backward
pass of a part counts as the part. Without a GPU (a trace made on the CPU) the XLA ops on
the host stand in for kernels.

Each of the top kernels also gets the bytes its HLO instructions read and write, from the
shapes in the HLO (every operand read once, the result written once; scratch workspaces
left out), and the bandwidth that gives: a memory-bound fusion far below the device's
bandwidth is one to look at. The line under it is where in the model it runs: the op name
of the instruction that takes most of its time.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import math
import re
import sys
from pathlib import Path

FAMILIES = [  # (family, regex on the kernel name), first match wins
    # first: cuDNN convolution kernels also say "cudnn" or "gemm"; "convert" fusions are not
    ("convolution", r"convol|conv2d|conv_|implicit"),
    ("attention (cuDNN flash)", r"cudnn|flash|fmha|sdpa"),
    ("matmul (XLA's Triton gemm fusions)", r"triton|gemm_fusion"),
    ("matmul (cuBLAS/cutlass gemm)", r"gemm|cutlass|sm90_xmma|nvjet|cublas|matmul"),
    ("reduction fusion", r"reduce|reduction"),
    ("transpose/copy", r"transpose|copy|memcpy|memset|dynamic.update.slice|slice"),
    ("elementwise/loop fusion", r"fusion|loop|elementwise|input_"),
]

# the step's named scopes (maetok_jax: model, losses, perceptual, targets, train)
PARTS = ("encoder", "decoder", "aux_decoders", "targets", "perceptual", "mask_loss", "optimiser")
HLO_NAME = "step.hlo.txt"  # the compiled step's HLO text, beside the trace
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*op_name="([^"]*)"')
CONTROL = re.compile(r"(while|conditional|call)\b")  # host events that contain other ops
_PART = re.compile(r"\b(" + "|".join(PARTS) + r")\b")


_DEFINITION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16|f8e\w+)\[([\d,]*)\]")
_OPERAND = re.compile(r"%([\w.\-]+)(?:#(\d+))?")
_BITS = {"pred": 8, "bf16": 16}


def _arrays(shape: str) -> list[tuple[str, int]]:
    """(dtype, bytes) of each array in an HLO shape, a tuple's in order."""
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        bits = _BITS.get(dtype) or (8 if dtype.startswith("f8") else int(dtype[1:]))
        out.append((dtype, bits // 8 * math.prod(int(d) for d in dims.split(",") if d)))
    return out


def instruction_bytes(hlo_text: str) -> dict[str, int]:
    """HLO instruction name → bytes it reads and writes: each operand (a tuple operand's
    element where one is named, ``%t#1``) once, plus its result; the 8-bit elements of a
    tuple result (cuBLAS and cuDNN scratch workspaces) are not counted."""
    sizes, out = {}, {}
    for line in hlo_text.splitlines():
        m = _DEFINITION.match(line)
        if not m:
            continue
        name, shape, _, rest = m.groups()
        arrays = _arrays(shape)
        sizes[name] = [size for _, size in arrays]
        scratch = ("s8", "u8") if shape.startswith("(") else ()
        written = sum(size for dtype, size in arrays if dtype not in scratch)
        read = 0
        for operand, index in _OPERAND.findall(rest.split(")", 1)[0]):
            parts = sizes.get(operand, [])
            read += parts[int(index)] if index and int(index) < len(parts) else sum(parts)
        out[name] = read + written
    return out


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name → its op name, the jitted function's name left off."""
    return {
        m.group(1): m.group(2).split(")/", 1)[-1] if m.group(2).startswith("jit(") else m.group(2)
        for m in map(_INSTRUCTION.match, hlo_text.splitlines())
        if m
    }


def part(op_name: str) -> str:
    """The outermost named scope in an op name (``other`` if none)."""
    return scope.group(1) if (scope := _PART.search(op_name)) else "other"


def family(name: str) -> str:
    low = name.lower()
    for fam, pattern in FAMILIES:
        if re.search(pattern, low):
            return fam
    return "other"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace_dir")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    files = sorted(Path(args.trace_dir).rglob("*.json.gz"))
    if not files:
        print(f"no *.json.gz trace under {args.trace_dir}")
        return 1
    with gzip.open(files[-1]) as f:
        data = json.loads(f.read())
    events = data["traceEvents"] if isinstance(data, dict) else data
    pids = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    gpu = {pid for pid, n in pids.items() if "gpu" in n.lower() or "/device:" in n.lower()}

    def is_kernel(e) -> bool:  # a GPU kernel, or (no GPU in the trace) an XLA op on the host
        if gpu:
            return e.get("ph") == "X" and "dur" in e and e.get("pid") in gpu
        # on the host a loop's event spans the ops of its body: count those, not the loop
        op = e.get("args", {}).get("hlo_op")
        return e.get("ph") == "X" and "dur" in e and op is not None and not CONTROL.match(op)

    hlo = next(iter(sorted(Path(args.trace_dir).rglob(HLO_NAME))), None)
    hlo_text = hlo.read_text() if hlo else ""
    op_of, bytes_of = op_names(hlo_text), instruction_bytes(hlo_text)
    kernels, count, parts = collections.Counter(), collections.Counter(), collections.Counter()
    moved, where_of = collections.Counter(), collections.defaultdict(collections.Counter)
    for e in filter(is_kernel, events):
        kernels[e["name"]] += e["dur"]
        count[e["name"]] += 1
        op = e.get("args", {}).get("hlo_op", "")
        moved[e["name"]] += bytes_of.get(op, 0)
        if op in op_of:
            where_of[e["name"]][op_of[op]] += e["dur"]
        scope = "(in a CUDA graph)" if op.startswith("command_buffer") else part(op_of.get(op, ""))
        parts[scope] += e["dur"]
    total = sum(kernels.values())
    if not total:
        print("no kernel events in the trace; processes: " + ", ".join(pids.values()))
        return 1
    where = "GPU kernel" if gpu else "XLA op (host)"
    print(f"{where} time in the trace: {total / 1e3:.1f} ms (3 steps)\n")
    if op_of:
        print("by part of the step (its named scope, forward and backward):")
        for name, us in parts.most_common():
            print(f"{name:34s}{us / 1e3:9.1f} ms {100 * us / total:6.1f}%")
        print()
    else:
        print(f"(no {HLO_NAME} beside the trace: no split by part)\n")
    fams = collections.Counter()
    for name, us in kernels.items():
        fams[family(name)] += us
    print("by kernel family:")
    for fam, us in fams.most_common():
        print(f"{fam:34s}{us / 1e3:9.1f} ms {100 * us / total:6.1f}%")
    print(f"\ntop {args.top} kernels (a call: ms, GB its instructions read and write, TB/s):")
    for name, us in kernels.most_common(args.top):
        per_call = f"{us / 1e3 / count[name]:8.3f} ms"
        if moved[name]:
            gb = moved[name] / count[name] / 1e9
            per_call += f" {gb:9.3g} GB {moved[name] / us / 1e6:6.3g} TB/s"
        else:
            per_call += " " * 23
        print(
            f"{us / 1e3:9.2f} ms {100 * us / total:5.1f}% ×{count[name]:<5d}{per_call}  {name[:80]}"
        )
        if where_of[name]:
            print(f"{'':11s}in {where_of[name].most_common(1)[0][0][-110:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

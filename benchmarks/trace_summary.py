"""Summarise a JAX profiler trace (the Perfetto JSON written by ``breakdown.py --trace``):
GPU time per kernel family, largest first.

    python benchmarks/trace_summary.py TRACE_DIR [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
from pathlib import Path

FAMILIES = [  # (family, regex on the kernel name), first match wins
    ("attention (cuDNN flash)", r"cudnn|flash|fmha|sdpa"),
    ("matmul (cuBLAS/cutlass gemm)", r"gemm|cutlass|sm90_xmma|nvjet|cublas|matmul"),
    ("triton fusion (gemm)", r"triton.*gemm|gemm.*triton"),
    ("convolution", r"conv|implicit"),
    ("reduction fusion", r"reduce|reduction"),
    ("transpose/copy", r"transpose|copy|memcpy|memset|dynamic.update.slice|slice"),
    ("elementwise/loop fusion", r"fusion|loop|elementwise|input_"),
]


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
    kernels = collections.Counter()
    count = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu and "dur" in e:
            kernels[e["name"]] += e["dur"]
            count[e["name"]] += 1
    total = sum(kernels.values())
    if not total:
        print("no GPU kernel events in the trace; processes: " + ", ".join(pids.values()))
        return 1
    fams = collections.Counter()
    for name, us in kernels.items():
        fams[family(name)] += us
    print(f"GPU kernel time in the trace: {total / 1e3:.1f} ms (3 steps)\n")
    for fam, us in fams.most_common():
        print(f"{fam:34s}{us / 1e3:9.1f} ms {100 * us / total:6.1f}%")
    print(f"\ntop {args.top} kernels:")
    for name, us in kernels.most_common(args.top):
        print(f"{us / 1e3:9.2f} ms {100 * us / total:5.1f}% ×{count[name]:<5d} {name[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

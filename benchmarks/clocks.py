"""The GPU's SM clock and power draw while a benchmark times something (NVIDIA only).

An H200 runs a sustained training step at its power limit: the SM clock then falls below its
maximum, by an amount that depends on the step's mix of matmuls and memory-bound kernels, and
on the card. Rows timed at different clocks are not comparable without it, so every timed
row records what ``nvidia-smi`` sampled during its timed steps:

    with ClockMonitor() as clocks:
        ...  # the timed steps
    clocks.summary()  # {"sm_clock_mhz": median, "power_w": median, ...} or {} where unknown

Nothing is sampled where ``nvidia-smi`` is missing (a CPU machine, another vendor's GPU).
"""

from __future__ import annotations

import shutil
import statistics
import subprocess

QUERY = "clocks.sm,power.draw,clocks.max.sm,power.limit"
PERIOD_MS = 200  # one sample per GPU this often


def parse(lines: list[str]) -> dict:
    """The summary of ``nvidia-smi --query-gpu=QUERY --format=csv,noheader,nounits`` lines:
    medians of the SM clock and power draw over every sample of every GPU, the largest
    maximum clock and power limit; ``{}`` when no line holds numbers ("[N/A]" fields are
    skipped)."""
    rows = []
    for line in lines:
        try:
            rows.append([float(f) for f in line.split(",")])
        except ValueError:
            continue
    rows = [r for r in rows if len(r) == 4]
    if not rows:
        return {}
    clock, power, clock_max, limit = zip(*rows)
    return {
        "sm_clock_mhz": statistics.median(clock),
        "sm_clock_max_mhz": max(clock_max),
        "power_w": statistics.median(power),
        "power_limit_w": max(limit),
        "clock_samples": len(rows),
    }


class ClockMonitor:
    """Samples ``nvidia-smi`` in a background process between ``__enter__`` and ``__exit__``."""

    def __init__(self, period_ms: int = PERIOD_MS):
        self.period_ms = period_ms
        self._proc = None
        self._lines: list[str] = []

    def __enter__(self) -> ClockMonitor:
        smi = shutil.which("nvidia-smi")
        if smi:
            cmd = [smi, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"]
            self._proc = subprocess.Popen(
                [*cmd, f"--loop-ms={self.period_ms}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        return self

    def __exit__(self, *exc) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        out, _ = self._proc.communicate(timeout=10)
        self._lines = out.splitlines()

    def summary(self) -> dict:
        return parse(self._lines)

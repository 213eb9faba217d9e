"""``maetok parity``: the report users run prints every row and its exit status is honest."""

from __future__ import annotations

from maetok import parity
from maetok.cli import main


def test_report_passes_on_tiny(device, capsys):
    status = main(["parity", "--preset", "tiny", "--device", device])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "within tolerance" in out
    for part in ("encoder", "grad", "trajectory"):
        assert part in out, f"no {part} row in the report:\n{out}"


def test_report_fails_when_a_tolerance_is_exceeded(device, capsys, monkeypatch):
    """With a tolerance no real computation meets, the report says FAIL and exits 1."""
    monkeypatch.setitem(parity.TOL, "forward_fp32", 0.0)
    status = main(["parity", "--preset", "tiny", "--device", device])
    out = capsys.readouterr().out
    assert status == 1
    assert "FAIL" in out

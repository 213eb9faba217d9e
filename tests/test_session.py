"""The test session's compile flags: only those this jaxlib accepts, never on a GPU run."""

import os

from tests import session


class _Config:
    def __init__(self, device: str):
        self.device = device

    def getoption(self, name, default=None):
        return self.device if name == "--device" else default


def test_compile_flags_this_jaxlib_rejects_are_left_out(monkeypatch):
    bogus = "--xla_cpu_no_such_flag_anywhere=true"
    monkeypatch.setattr(session, "FAST_COMPILE", (*session.FAST_COMPILE, bogus))
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/nowhere")
    session.configure(_Config("cpu"))
    flags = os.environ["XLA_FLAGS"].split()
    assert flags[0] == "--xla_dump_to=/nowhere"  # the user's flags first, kept
    assert "--xla_backend_optimization_level=0" in flags and bogus not in flags


def test_no_compile_flags_on_a_gpu_run_or_over_the_users_own(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    session.configure(_Config("cuda"))
    assert os.environ["XLA_FLAGS"] == ""
    own = "--xla_backend_optimization_level=2 --xla_cpu_use_fusion_emitters=true"
    monkeypatch.setenv("XLA_FLAGS", own)
    session.configure(_Config("cpu"))  # each already set by the user: nothing added or probed
    assert os.environ["XLA_FLAGS"] == own

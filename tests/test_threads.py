"""The thread policy for CPUs that other processes share (dgm/threads.py)."""

import os
import sys

import pytest
import torch

from dgm import threads


def test_others_busy_time_excludes_our_own(monkeypatch):
    monkeypatch.setattr(os, "sysconf", lambda name: 100)  # clock ticks per second
    # All cores were busy 200 ticks over 1 s, of which we were 50: others used 1.5 cores.
    assert threads._others((100, 10), (300, 60), 1.0) == 1.5
    assert threads._others((100, 10), (150, 60), 1.0) == 0.0  # never negative


@pytest.mark.skipif(sys.platform != "linux", reason="the load is read from Linux's /proc")
def test_the_load_is_measured_on_linux():
    """Planted bug: _busy_ticks returning None (no measurement) left the policy at torch's
    default while every other check here still passed."""
    assert threads._busy_ticks() is not None
    busy = threads.others_busy_cores(0.05)
    assert busy is not None and 0 <= busy <= (os.cpu_count() or 1) + 0.5
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # with one thread the policy has nothing to choose
    try:
        policy = threads.ThreadPolicy(0)
        assert policy.last is not None
        policy.restore()
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(sys.platform != "linux", reason="the load is read from Linux's /proc")
def test_threads_follow_the_idle_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # A core counts when at least three quarters of it is idle.
        for busy, want in ((0.0, 2), (0.2, 2), (0.3, 1), (1.0, 1), (1.9, 1)):
            monkeypatch.setattr(threads, "others_busy_cores", lambda interval=0.1, b=busy: b)
            policy = threads.ThreadPolicy(0)
            assert torch.get_num_threads() == want, busy
            policy.restore()
            assert torch.get_num_threads() == 2
        fixed = threads.ThreadPolicy(1)
        assert torch.get_num_threads() == 1
        fixed.update()
        assert torch.get_num_threads() == 1
        fixed.restore()
        threads.ThreadPolicy(-1)  # a GPU run leaves them alone
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_training_flushes_subnormal_floats_and_then_stops(monkeypatch, tmp_path):
    """Subnormal floats (Adam's moments of weights that never get a gradient) are many times
    slower on x86: ``train`` flushes them to 0 while it runs, then gives the process back
    as it was. Planted bugs it catches: no flush, the flush left on after training, a
    caller's own flush turned off."""
    import dgm.train
    from dgm.config import VAEConfig

    tiny = torch.tensor(1e-39)  # subnormal in float32
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormal floats")
    torch.set_flush_denormal(False)
    seen = []
    monkeypatch.setattr(dgm.train, "_train",
                        lambda *args: seen.append((tiny * 1.0).item()) or (None, []))
    assert (tiny * 1.0).item() > 0
    dgm.train.train("vae", VAEConfig(device="cpu"), tmp_path / "r")
    assert seen == [0.0]
    assert (tiny * 1.0).item() > 0
    torch.set_flush_denormal(True)  # a caller that flushes already keeps it on
    try:
        dgm.train.train("vae", VAEConfig(device="cpu"), tmp_path / "r")
        assert seen == [0.0, 0.0] and (tiny * 1.0).item() == 0
    finally:
        torch.set_flush_denormal(False)

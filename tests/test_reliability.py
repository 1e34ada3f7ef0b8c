"""What must hold when things go wrong: kills, races, corrupt input, full disks."""

import errno
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import vae

from dgm.cli import main
from dgm.config import from_dict
from dgm.data import read_idx
from dgm.errors import DgmError
from dgm.runs import load_checkpoint, read_metrics, read_yaml

FIXTURE = HealthCheck.function_scoped_fixture
ENV = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}


def start(argv):
    return subprocess.Popen([sys.executable, "-m", "dgm", *argv], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _epoch_saved(last) -> int:
    """The epoch in last.pt, 0 before the first; a file being replaced is read again."""
    for _ in range(20):
        if not last.exists():
            return 0
        try:
            return load_checkpoint(last)["epoch"]
        except DgmError:
            time.sleep(0.05)
    raise AssertionError(f"{last} stayed unreadable")


def test_sigkill_at_random_moments_loses_nothing(fake_data_dir, tmp_path):
    """Kills at random moments, every other one just after a new checkpoint landed, so that
    resumes from a mid-run checkpoint surely happen; the final weights equal an uninterrupted
    run's. Planted bug it catches: a resume that does not restore the optimisers' states
    (``opt.load_state_dict`` skipped in dgm/train.py), which the epoch counts alone miss."""
    run, epochs = tmp_path / "run", 6
    fresh = vae(fake_data_dir, run, "--epochs", str(epochs), "--sample-epochs", "0,2,4")
    resume = ["train", "vae", "--resume", str(run), "--quiet"]
    last = run / "checkpoints" / "last.pt"
    rng = random.Random(0)
    started_from = []  # the epoch in last.pt at each start
    for i in range(5):
        started_from.append(_epoch_saved(last))
        proc = start(resume if last.exists() else fresh)
        if i % 2:
            deadline = time.monotonic() + 60
            while (_epoch_saved(last) <= started_from[-1] and proc.poll() is None
                   and time.monotonic() < deadline):
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))
        else:
            time.sleep(rng.uniform(1.0, 4.0))  # start-up takes ~1 s, an epoch a fraction
        proc.kill()
        proc.wait()
    started_from.append(_epoch_saved(last))
    proc = start(resume if last.exists() else fresh)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert any(1 <= e < epochs for e in started_from[1:]), started_from  # a real resume
    ckpt = load_checkpoint(last)
    assert ckpt["epoch"] == epochs
    assert [r["epoch"] for r in read_metrics(run)] == list(range(1, epochs + 1))
    assert [r["epoch"] for r in ckpt["history"]] == list(range(1, epochs + 1))
    assert not list(run.rglob(".*.tmp"))
    assert main(vae(fake_data_dir, tmp_path / "whole", "--epochs", str(epochs),
                    "--sample-epochs", "0,2,4")) == 0
    whole = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")["state_dict"]
    for k, v in whole.items():
        torch.testing.assert_close(ckpt["state_dict"][k], v, rtol=0, atol=0)


def test_second_process_on_the_same_run_is_refused(fake_data_dir, tmp_path):
    run = tmp_path / "run"
    first = start(vae(fake_data_dir, run, "--epochs", "10000"))
    try:
        deadline = time.time() + 60
        while not (run / "checkpoints" / "last.pt").exists() and time.time() < deadline:
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "dgm", "train", "vae", "--resume",
                                 str(run), "--quiet"], env=ENV, capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 1
        assert "in use by another dgm process" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)


def valid_idx() -> bytes:
    a = np.arange(2 * 3 * 4, dtype=np.uint8)
    return bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (2, 3, 4)) + a.tobytes()


@settings(max_examples=300, deadline=None, suppress_health_check=[FIXTURE])
@given(data=st.one_of(
    st.binary(max_size=64),
    st.builds(lambda i, b: valid_idx()[:i] + b, st.integers(0, 40), st.binary(max_size=16)),
    st.builds(lambda i, v: valid_idx()[:i] + bytes([v]) + valid_idx()[i + 1:],
              st.integers(0, 39), st.integers(0, 255)),
))
def test_fuzzed_idx_files_fail_cleanly(tmp_path, data):
    path = tmp_path / "fuzz"
    path.write_bytes(data)
    try:
        array = read_idx(path)
    except DgmError as e:
        assert "\n" not in str(e)
    else:
        assert array.nbytes <= len(data)  # nothing allocated beyond what the file holds


@settings(max_examples=300, deadline=None, suppress_health_check=[FIXTURE])
@given(text=st.one_of(
    st.text(max_size=80),
    st.builds(lambda k, v: f"{k}: {v}\n", st.sampled_from(["latent_dim", "lr", "epochs",
                                                            "sample_epochs", "dataset", "x"]),
              st.text(max_size=20)),
))
def test_fuzzed_yaml_configs_fail_cleanly(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        cfg = from_dict("vae", read_yaml(path), source=str(path))
    except DgmError as e:
        assert "\n" not in str(e)
    else:
        assert cfg.latent_dim >= 1 and cfg.epochs >= 0


def test_run_folder_that_cannot_be_created(fake_data_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(vae(fake_data_dir, blocker / "run", "--epochs", "1")) == 1
    err = capsys.readouterr().err
    assert err.count("dgm: error:") == 1 and "Traceback" not in err and str(blocker) in err


def test_disk_full_at_a_checkpoint_keeps_the_last_good_one(fake_data_dir, tmp_path, capsys,
                                                           monkeypatch):
    run = tmp_path / "run"
    assert main(vae(fake_data_dir, run, "--epochs", "1")) == 0
    good = (run / "checkpoints" / "last.pt").read_bytes()
    real_fsync = os.fsync

    def full(fd):
        real_fsync(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert main(["train", "vae", "--resume", str(run), "--epochs", "3", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert (run / "checkpoints" / "last.pt").read_bytes() == good
    assert not list(run.rglob(".*.tmp"))
    assert main(["train", "vae", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2

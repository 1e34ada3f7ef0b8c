"""What must hold when things go wrong: kills, races, corrupt input, full disks."""

import errno
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
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
        # The first kill lands just after a checkpoint: on a fast machine a whole run fits in
        # a random 1-4 s, and a run that is already done has nothing left to resume.
        if i % 2 == 0:
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
    """The same as test_a_full_disk_loses_nothing where tmpfs cannot be mounted: a disk that
    fills at the fsync."""
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
    assert "the disk is full: could not write" in err and "Traceback" not in err
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert (run / "checkpoints" / "last.pt").read_bytes() == good
    assert not list(run.rglob(".*.tmp"))
    assert main(["train", "vae", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2


def test_interrupt_at_any_moment_of_start_up_is_one_line(fake_data_dir, tmp_path):
    """Planted bug: a package __init__ that imports torch before main() runs: an interrupt
    during that import ends in a KeyboardInterrupt traceback."""
    # From the moment dgm's entry point runs, through its imports and training. Before
    # that, in the interpreter's own start and the import of the entry module (a few lines
    # that import only sys), an interrupt is Python's to report, as for any program.
    up = ("import sys; from dgm.__main__ import main; print('up', file=sys.stderr, "
          "flush=True); sys.exit(main())")
    delays = [0.0, 0.05, 0.15, 0.3, 0.5, 0.8, 1.2, 1.8, 2.6, 3.5]
    for i, delay in enumerate(delays):
        # Ctrl-C's default disposition, whatever this process inherited (a test run started
        # in the background of a script ignores SIGINT, and so would every child).
        proc = subprocess.Popen(
            [sys.executable, "-c", up, *vae(fake_data_dir, tmp_path / f"r{i}", "--epochs",
                                            "50")],
            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        assert proc.stderr.readline() == "up\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 130, (delay, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, (delay, err)


def test_the_command_line_answers_before_torch_is_imported():
    """What keeps --help fast and start-up interruptible: dgm.cli imports no torch."""
    code = "import sys, dgm.cli; dgm.cli.build_parser(); assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], env=ENV).returncode == 0


# Two dgm processes on one run folder.

def test_two_evaluations_ending_at_once_keep_both_results(fake_data_dir, tmp_path,
                                                          monkeypatch):
    """Planted bug: save_evaluation's read-modify-write without its lock; the first
    writer's result is lost when a second one read the file before it wrote."""
    import json
    import threading

    import dgm.runs

    run = tmp_path / "run"
    run.mkdir()
    real = dgm.runs.read_evaluations
    both_read = threading.Barrier(2, timeout=2)

    def slow_read(path):
        out = real(path)
        try:
            both_read.wait()  # without the lock both threads read before either writes
        except threading.BrokenBarrierError:
            pass  # with the lock the other thread waits outside: go on alone
        return out

    monkeypatch.setattr(dgm.runs, "read_evaluations", slow_read)
    threads = [threading.Thread(target=dgm.runs.save_evaluation, args=(run, k, {"v": k}))
               for k in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(json.loads((run / "evaluation.json").read_text())) == ["a", "b"]


def test_two_evaluate_processes_at_once_keep_both(fake_data_dir, tmp_path):
    import json

    run = tmp_path / "run"
    assert main(vae(fake_data_dir, run, "--epochs", "1")) == 0
    procs = [start(["evaluate", str(run), "--iw-samples", k, "--no-naive", "--quiet"])
             for k in ("3", "4")]
    procs.append(start(["report", str(run)]))
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    saved = json.loads((run / "evaluation.json").read_text())
    assert sorted(saved) == ["test[64:] (best, k=3)", "test[64:] (best, k=4)"]
    assert (run / "report.html").stat().st_size > 0


# A disk that fills: a real one, a small tmpfs.

@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)],
                                 capture_output=True).returncode == 0
    except OSError:
        mounted = False
    if not mounted:
        pytest.skip("mount -t tmpfs is refused here (needs root); the full-disk test needs it")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk, leave: int = 0) -> None:
    """Fill ``disk`` up, then give back about ``leave`` bytes."""
    filler = disk / "filler"
    with open(filler, "ab") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))


def full_disk_error(capsys, argv, path):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"the disk is full: could not write {path}" in err and "free there" in err, err
    return err


def test_a_full_disk_loses_nothing(fake_data_dir, small_disk, tmp_path, capsys):
    """Planted bugs: torch.save straight into the file (a full disk then raises a
    RuntimeError about file positions, with no path); no ENOSPC handling in atomic_write."""
    run = small_disk / "run"
    assert main(vae(fake_data_dir, run, "--epochs", "1")) == 0
    good = (run / "checkpoints" / "last.pt").read_bytes()
    files = sorted(p for p in run.rglob("*"))
    fill(small_disk, leave=64 * 1024)  # room for config and metrics, not a checkpoint
    err = full_disk_error(capsys, ["train", "vae", "--resume", str(run), "--epochs", "2",
                                   "--quiet"], run / "checkpoints")
    assert f"continue with: dgm train vae --resume {run}" in err
    assert (run / "checkpoints" / "last.pt").read_bytes() == good
    assert not list(small_disk.rglob(".*.tmp"))
    fill(small_disk)
    full_disk_error(capsys, ["sample", str(run), "--out", str(small_disk / "s.png")],
                    small_disk / "s.png")
    full_disk_error(capsys, ["report", str(run)], run / "report.html")
    full_disk_error(capsys, ["evaluate", str(run), "--iw-samples", "2", "--no-naive"],
                    run / "evaluation.json")
    assert not (run / "evaluation.json").exists() and not (small_disk / "s.png").exists()
    assert not list(small_disk.rglob(".*.tmp"))
    assert sorted(p for p in run.rglob("*") if p.name != ".evaluation.lock") == files
    (small_disk / "filler").unlink()
    assert main(["train", "vae", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2


def test_a_signal_the_process_ignores_stays_ignored():
    """Planted bug it catches: held() installing its catcher over SIG_IGN, which turned an
    ignored Ctrl-C (a background job of a script) into an interrupt."""
    from dgm import interrupts
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts.held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    except KeyboardInterrupt:
        pytest.fail("an ignored SIGINT became an interrupt")
    finally:
        signal.signal(signal.SIGINT, before)

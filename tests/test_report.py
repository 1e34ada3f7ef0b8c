"""The HTML report, opened in a real headless browser, and the data and TensorBoard commands."""

import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import write_idx
from test_cli import vae

from dgm.cli import main
from dgm.runs import read_evaluations, read_metrics


@pytest.fixture
def run_pair(fake_data_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(vae(fake_data_dir, a, "--epochs", "2", "--latent-dim", "2",
                    "--sample-epochs", "0,1")) == 0
    assert main(vae(fake_data_dir, b, "--epochs", "2", "--lr", "1e-2")) == 0
    assert main(["evaluate", str(a), "--iw-samples", "10", "--quiet"]) == 0
    return a, b


def test_report_is_self_contained(run_pair, tmp_path):
    a, b = run_pair
    assert (a / "report.html").is_file()  # train writes it at the end
    assert main(["report", str(a)]) == 0
    page = (a / "report.html").read_text()
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    # Every image embedded, nothing fetched: no src or href, in any quoting, and no CSS url()
    # that points outside the page.
    assert not re.search(r"""(?:src|href)\s*=\s*(?!["']?(?:data:|#))|url\(\s*(?!["']?data:)""",
                         page, re.IGNORECASE)
    for needle in ("Configuration", "Evaluation", "Metrics per epoch", "Samples by epoch",
                   "Manifold by epoch", "iwae.log_px_nats", "epoch 0", "latent_dim"):
        assert needle in page, needle
    # The numbers themselves, to 6 significant digits beside their names (planted bug: the
    # evaluation's values shown one row off).
    evaluation = next(iter(read_evaluations(a).values()))
    cells = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td></tr>", page)
    for name, value in (("iwae.log_px_nats", evaluation["iwae"]["log_px_nats"]),
                        ("elbo.bits_per_dim", evaluation["elbo"]["bits_per_dim"]),
                        ("latent_dim", 2)):
        assert (name, f"{value:.6g}" if isinstance(value, float) else str(value)) in cells
    last = read_metrics(a)[-1]
    assert "".join(f"<td>{v:.6g}</td>" for v in last.values()) in page
    out = tmp_path / "cmp.html"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    cmp = out.read_text()
    assert "Side by side" in cmp and ">a<" in cmp and ">b<" in cmp
    assert not (tmp_path / "cmp.curves.png").exists()


@pytest.mark.skipif(not shutil.which("chromium"), reason="chromium not installed (CI installs it)")
def test_report_loads_in_headless_chromium(run_pair, tmp_path):
    a, b = run_pair
    out = tmp_path / "cmp.html"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    for page in (a / "report.html", out):
        proc = subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
            capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        n_img = page.read_text().count("<img ")
        assert n_img >= 2
        # the page's own script counts the images that decoded
        assert f'data-images="{n_img}/{n_img}"' in proc.stdout, proc.stdout[-500:]
        console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
        assert not console, console


def test_data_commands(tmp_path, capsys, monkeypatch):
    """``data list`` and ``data check`` on a folder the test builds: MNIST's training split
    present (its files have no known checksum, so the check is structural), the rest
    missing. Planted bug it catches: cmd_data ignoring --data-dir (``find_file(name, key,
    None, ...)``), which lists every file missing."""
    import dgm.data

    # Only the folder built here, the empty cache and nothing of this machine's.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DGM_DATA_DIR", raising=False)
    real = dgm.data.search_dirs
    monkeypatch.setattr(dgm.data, "search_dirs", lambda name, data_dir=None: [
        d for d in real(name, data_dir) if tmp_path in d.parents])
    root = tmp_path / "data"
    images = write_idx(root / "mnist" / "train-images-idx3-ubyte", np.zeros((5, 28, 28)))
    labels = write_idx(root / "mnist" / "train-labels-idx1-ubyte", np.arange(5), gz=False)
    for action in ("list", "check"):
        assert main(["data", action, "--data-dir", str(root)]) == 0
        lines = capsys.readouterr().out.splitlines()
        found = [line.split()[:2] for line in lines if line.startswith("  ")]
        fashion = [[key, "missing"] for key in ("train-images", "train-labels",
                                                "test-images", "test-labels")]
        assert found == [["train-images", str(images)], ["train-labels", str(labels)],
                         ["test-images", "missing"], ["test-labels", "missing"], *fashion], lines
        checked = [line for line in lines if " ok " in line]
        if action == "check":
            assert len(checked) == 2 and "ok (5, 28, 28)" in checked[0], lines
            assert "ok (5,)" in checked[1], lines
        else:
            assert not checked


def test_data_check_finds_a_corrupt_file(fake_data_dir, capsys):
    (fake_data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8bgarbage")
    assert main(["data", "check", "--data-dir", str(fake_data_dir)]) == 1
    captured = capsys.readouterr()
    assert "BAD" in captured.out and "failed the check" in captured.err


def test_tensorboard_logs_or_says_how_to_install(fake_data_dir, tmp_path, capsys, monkeypatch):
    """--tensorboard logs each epoch's metrics and sample grid (read back from the event
    file), and without the package ends in one line that says how to install it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(vae(fake_data_dir, run, "--epochs", "2", "--tensorboard")) == 0
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    metrics = read_metrics(run)
    assert len(metrics) == 2 and "val_elbo" in metrics[0]
    for name in metrics[0]:  # every column of metrics.csv, each epoch
        logged = events.Scalars(name)
        assert [e.step for e in logged] == [1, 2]
        assert [e.value for e in logged] == pytest.approx([m[name] for m in metrics])
    grids = sorted(int(p.stem[len("epoch_"):]) for p in (run / "samples").glob("epoch_*.png"))
    assert grids[-1] == 2  # every grid the run saved after training began is logged too
    assert [e.step for e in events.Images("samples")] == [e for e in grids if e > 0]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    assert main(vae(fake_data_dir, tmp_path / "r2", "--epochs", "1", "--tensorboard")) == 1
    err = capsys.readouterr().err
    assert "pip install tensorboard" in err and len(err.strip().splitlines()) == 1

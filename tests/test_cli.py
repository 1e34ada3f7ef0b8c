"""End-to-end runs of the command line, and its promises about bad input and interruptions."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from dgm.cli import main
from dgm.runs import RunLock, load_checkpoint, read_metrics

TINY = ["--hidden-dim", "32", "--batch-size", "32", "--quiet"]


def vae(fake_data_dir, out, *extra):
    return ["train", "vae", "--dataset", "mnist", "--data-dir", str(fake_data_dir), "--offline",
            "--train-split", "train[:192]", "--val-split", "test[:64]", "--test-split",
            "test[64:]", "--out", str(out), *TINY, *extra]


def test_vae_end_to_end(fake_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(vae(fake_data_dir, run, "--epochs", "2", "--latent-dim", "2",
                    "--sample-epochs", "0,1", "--manifold-epochs", "0")) == 0
    for f in ("config.yaml", "metrics.csv", "curves.png", "checkpoints/last.pt",
              "checkpoints/best.pt", "samples/epoch_000.png", "samples/epoch_001.png",
              "samples/epoch_002.png", "manifold/epoch_000.png", "manifold/epoch_002.png"):
        assert (run / f).is_file(), f
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train_elbo", "val_elbo"} <= rows[0].keys()
    assert yaml.safe_load((run / "config.yaml").read_text())["latent_dim"] == 2

    assert main(["evaluate", str(run), "--iw-samples", "20", "--json", "--offline"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert json.loads((run / "evaluation.json").read_text()) == {"test[64:] (best, k=20)": res}
    assert res["n_images"] == 64 and res["iwae"]["k"] == 20
    assert res["elbo"]["log_px_nats"] <= res["iwae"]["log_px_nats"]
    assert res["iwae"]["bits_per_dim"] > 0

    assert main(["sample", str(run), "-n", "9", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["manifold", str(run), "--size", "5", "--out", str(tmp_path / "m.png")]) == 0
    assert main(["interpolate", str(run), "--rows", "2", "--steps", "3",
                 "--out", str(tmp_path / "i.png")]) == 0
    for f in ("s.png", "m.png", "i.png"):
        assert (tmp_path / f).stat().st_size > 0


@pytest.mark.parametrize("ema", ["0", "0.9"])
def test_progress_lines_of_every_epoch(fake_data_dir, tmp_path, capsys, ema):
    # Every other CLI test trains --quiet; a user does not, and the second epoch's
    # progress line once crashed a run (a name reused for the printed line).
    args = [a for a in vae(fake_data_dir, tmp_path / "run", "--epochs", "3", "--ema", ema)
            if a != "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    for epoch in (1, 2, 3):
        assert f"epoch {epoch}/3  train_" in out


def test_resume_equals_uninterrupted_run(fake_data_dir, tmp_path):
    assert main(vae(fake_data_dir, tmp_path / "a", "--epochs", "3")) == 0
    assert main(vae(fake_data_dir, tmp_path / "b", "--epochs", "1")) == 0
    assert main(["train", "vae", "--resume", str(tmp_path / "b"), "--epochs", "3",
                 "--quiet"]) == 0
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=0, atol=0)
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(tmp_path / "a")]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"}
                     for r in read_metrics(tmp_path / "b")]


def test_yaml_config_and_flags_win(fake_data_dir, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("latent_dim: 3\nhidden_dim: 16\nepochs: 1\n")
    run = tmp_path / "run"
    assert main(vae(fake_data_dir, run, "--config", str(cfg), "--latent-dim", "4")) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["latent_dim"] == 4 and saved["hidden_dim"] == 32 and saved["epochs"] == 1


def test_a_config_names_its_model(fake_data_dir, tmp_path, capsys):
    """`dgm train --config FILE` trains the model that FILE's `model:` names, as every recipe
    and run config has one; a file without one is a one-line error."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: vae\nlatent_dim: 3\nepochs: 1\n")
    argv = vae(fake_data_dir, tmp_path / "run", "--config", str(cfg))
    assert main(["train", *argv[2:]]) == 0
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["latent_dim"] == 3
    assert main(["train", f"--config={cfg}", *argv[2:-2], "--out", str(tmp_path / "r2")]) == 0
    cfg.write_text("latent_dim: 3\n")
    one_line_error(capsys, 1, ["train", "--config", str(cfg)], "names no model")
    assert not (tmp_path / "r3").exists()


@pytest.mark.parametrize("argv", [[], ["train"], ["train", "vae"], ["train", "gan"],
                                  ["train", "flow"], ["train", "diffusion"], ["evaluate"],
                                  ["sample"], ["manifold"], ["interpolate"], ["report"], ["data"]])
def test_help_of_every_command(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    assert "usage: dgm" in capsys.readouterr().out


def one_line_error(capsys, code, argv, match):
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("dgm: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert match in errors[0], err


def test_bad_input_gives_one_line(fake_data_dir, tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("latent_dim: twenty\n")
    broken_yaml = tmp_path / "broken.yaml"
    broken_yaml.write_text("latent_dim: [1,\n")
    unknown_yaml = tmp_path / "unknown.yaml"
    unknown_yaml.write_text("latnet_dim: 3\n")
    cases = [
        (vae(tmp_path / "empty", tmp_path / "r1"), "not found"),
        (vae(fake_data_dir, tmp_path / "r2", "--latent-dim", "-3"), "latent_dim must be >= 1"),
        (vae(fake_data_dir, tmp_path / "r3", "--config", str(bad_yaml)), "must be of type int"),
        (vae(fake_data_dir, tmp_path / "r4", "--config", str(broken_yaml)), "not valid YAML"),
        (vae(fake_data_dir, tmp_path / "r5", "--config", str(unknown_yaml)), "'latnet_dim'"),
        (vae(fake_data_dir, tmp_path / "r6", "--config", str(tmp_path / "no.yaml")), "no.yaml"),
        (vae(fake_data_dir, tmp_path / "r7", "--train-split", "valid"), "bad split"),
        (["train", "vae", "--dataset", "cifar"], "option dataset must be mnist, fashion-mnist"),
        (["evaluate", str(tmp_path)], "not a dgm run folder"),
        (["sample", str(tmp_path / "missing"), "--out", "x.png"], "not a dgm run folder"),
    ]
    for argv, match in cases:
        one_line_error(capsys, 1, argv, match)
    # argparse-level mistakes: usage errors exit 2, also on one line
    for argv in (["train", "vae", "--epochs", "x"], ["train", "wgan"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "error" in err


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_refuses_foreign_tampered_and_newer_checkpoints(fake_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(vae(fake_data_dir, run, "--epochs", "1")) == 0
    last = run / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    one_line_error(capsys, 1, ["train", "gan", "--resume", str(run)], "is a vae run")
    one_line_error(capsys, 1, vae(fake_data_dir, run, "--epochs", "2"), "--resume")
    config = run / "config.yaml"
    original = config.read_text()
    config.write_text(original.replace("hidden_dim: 32", "hidden_dim: 33"))
    one_line_error(capsys, 1, ["train", "vae", "--resume", str(run)], "does not fit")
    one_line_error(capsys, 1, ["sample", str(run), "--out", str(tmp_path / "s.png")],
                   "does not fit")
    config.write_text(original)
    torch.save({**ckpt, "format_version": 99}, last)
    one_line_error(capsys, 1, ["evaluate", str(run), "--checkpoint", "last"], "newer")
    torch.save({**ckpt, "model": "gan"}, last)
    one_line_error(capsys, 1, ["train", "vae", "--resume", str(run)], "holds a gan model")
    last.write_bytes(last.read_bytes()[:1000])
    one_line_error(capsys, 1, ["train", "vae", "--resume", str(run)], "corrupt")
    # a pickle that would run code is refused by weights_only loading
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    last.write_bytes(pickle.dumps(Evil()))
    one_line_error(capsys, 1, ["train", "vae", "--resume", str(run)], "corrupt")


def test_non_finite_loss_keeps_last_good_checkpoint(fake_data_dir, tmp_path, capsys,
                                                     monkeypatch):
    run = tmp_path / "run"
    assert main(vae(fake_data_dir, run, "--epochs", "1")) == 0
    before = (run / "checkpoints" / "last.pt").read_bytes()
    from dgm.models.vae import VAE

    def nan_step(self, x, optimizers):
        return {"train_elbo": torch.tensor(float("nan"))}

    monkeypatch.setattr(VAE, "training_step", nan_step)
    one_line_error(capsys, 1, ["train", "vae", "--resume", str(run), "--epochs", "2",
                               "--quiet"], "non-finite")
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    assert len(read_metrics(run)) == 1


def test_second_process_on_same_run_is_refused(tmp_path):
    from dgm.errors import DgmError

    lock = RunLock(tmp_path)
    with pytest.raises(DgmError, match="in use by another dgm process"):
        RunLock(tmp_path)
    lock.release()
    RunLock(tmp_path).release()


def test_sigterm_saves_and_exits_non_zero_then_resumes(fake_data_dir, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "dgm", *vae(fake_data_dir, run, "--epochs", "10000")]
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    last = run / "checkpoints" / "last.pt"
    deadline = time.time() + 60
    while not last.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    epochs = load_checkpoint(last)["epoch"]
    assert [r["epoch"] for r in read_metrics(run)] == list(range(1, epochs + 1))
    assert main(["train", "vae", "--resume", str(run), "--epochs", str(epochs + 1),
                 "--quiet"]) == 0
    assert load_checkpoint(last)["epoch"] == epochs + 1


def test_ema_weights_are_the_evaluated_model_and_resume_exactly(fake_data_dir, tmp_path):
    from dgm.evaluate import load_model

    assert main(vae(fake_data_dir, tmp_path / "a", "--epochs", "3", "--ema", "0.9")) == 0
    assert main(vae(fake_data_dir, tmp_path / "b", "--epochs", "1", "--ema", "0.9")) == 0
    assert main(["train", "vae", "--resume", str(tmp_path / "b"), "--epochs", "3",
                 "--quiet"]) == 0
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    for k in a["ema_state_dict"]:
        torch.testing.assert_close(a["ema_state_dict"][k], b["ema_state_dict"][k], rtol=0,
                                   atol=0)
    _, _, model, _ = load_model(tmp_path / "a", "last", "cpu")
    weight = model.state_dict()["encoder.0.weight"]
    torch.testing.assert_close(weight, a["ema_state_dict"]["module.encoder.0.weight"])
    assert not torch.equal(weight, a["state_dict"]["encoder.0.weight"])


def test_ema_follows_its_recurrence(fake_data_dir, tmp_path, monkeypatch):
    """The checkpoint's averaged weights equal e <- d e + (1 - d) w computed by hand from the
    weights after each optimiser step (the first step's weights start the average, as
    AveragedModel does). Planted bugs it catches: ``averaged.update_parameters(model)``
    removed from _train_epoch (the average stays at the initial weights), and the decay
    swapped (d for 1 - d)."""
    from dgm.models.vae import VAE

    after: list[dict] = []
    real = VAE.training_step

    def recording(self, x, optimizers):
        out = real(self, x, optimizers)
        after.append({k: v.detach().clone() for k, v in self.state_dict().items()})
        return out

    monkeypatch.setattr(VAE, "training_step", recording)
    d = 0.9
    assert main(vae(fake_data_dir, tmp_path / "a", "--epochs", "2", "--ema", str(d))) == 0
    assert len(after) == 12  # 192 images in batches of 32, two epochs
    ema = dict(after[0])
    for w in after[1:]:
        ema = {k: d * ema[k] + (1 - d) * w[k] for k in ema}
    saved = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["ema_state_dict"]
    assert saved["n_averaged"].item() == 12
    for k, v in ema.items():
        torch.testing.assert_close(saved[f"module.{k}"], v, rtol=1e-5, atol=1e-7)
    # and the average is not just the last weights
    assert not torch.allclose(saved["module.encoder.0.weight"], after[-1]["encoder.0.weight"])

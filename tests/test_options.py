"""Every option value that --help offers, run end to end through the command line.

The lists below are checked against the parser itself, so an option added without a run
here fails ``test_every_offered_value_is_covered``.
"""

import argparse
import dataclasses
import json
import shutil

import pytest
import torch
from PIL import Image

from dgm.cli import build_parser, main
from dgm.config import CONFIGS, field_type
from dgm.distributed import cpu_has_native_bf16

TINY = {
    "vae": ["--hidden-dim", "16", "--latent-dim", "2"],
    "gan": ["--latent-dim", "8"],
    "flow": ["--hidden-dim", "8", "--num-couplings", "1", "--num-scales", "1"],
    "diffusion": ["--channels", "4", "--channel-mults", "1,2,2", "--sample-steps", "1"],
}
# Values that need what this machine may lack: the one-line error that names the fix.
NEEDS = {
    ("device", "cuda"): (torch.cuda.is_available(), "no CUDA GPU"),
    ("precision", "bf16"): (cpu_has_native_bf16() if not torch.cuda.is_available()
                            else torch.cuda.is_bf16_supported(), "native bf16"),
    # The mlp default refuses it; the conv GAN runs it in test_every_command_on_every_model.
    ("minibatch_std", True): (False, "give --arch conv"),
}
try:
    import torch.utils.tensorboard  # noqa: F401
    HAVE_TENSORBOARD = True
except ImportError:
    HAVE_TENSORBOARD = False
NEEDS[("tensorboard", True)] = (HAVE_TENSORBOARD, "pip install tensorboard")
# Choice-valued options of the other commands, as (command, option) -> values run below.
COMMAND_CHOICES = {
    ("evaluate", "--checkpoint"): {"best", "last"},
    ("evaluate", "--device"): {"auto", "cpu", "cuda"},
    ("sample", "--checkpoint"): {"best", "last"},
    ("sample", "--device"): {"auto", "cpu", "cuda"},
    ("manifold", "--checkpoint"): {"best", "last"},
    ("manifold", "--device"): {"auto", "cpu", "cuda"},
    ("interpolate", "--checkpoint"): {"best", "last"},
    ("interpolate", "--device"): {"auto", "cpu", "cuda"},
    ("interpolate", "--method"): {"cdf", "slerp"},
    ("data", "action"): {"list", "check"},
    ("score", "--device"): {"auto", "cpu", "cuda"},
    ("export", "--checkpoint"): {"best", "last"},
    ("sample", "--sampler"): {"ddim", "ddpm"},
    ("evaluate", "--sampler"): {"ddim", "ddpm"},  # each diffusion run below scores the other
    ("sample", "--precision"): {"fp32", "bf16", "auto"},
    ("evaluate", "--precision"): {"fp32", "bf16", "auto"},
}


def offered_values(model: str) -> list[tuple[str, object]]:
    """Every (option, value) of a model's training options that has a fixed set of values."""
    out = []
    for f in dataclasses.fields(CONFIGS[model]):
        base, _ = field_type(f)
        if "choices" in f.metadata:
            out += [(f.name, v) for v in f.metadata["choices"]]
        elif base is bool:
            out += [(f.name, True), (f.name, False)]
    return out


def flag(name: str, value) -> list[str]:
    opt = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [opt if value else "--no-" + name.replace("_", "-")]
    return [opt, str(value)]


@pytest.fixture
def both_data_dir(fake_data_dir):
    shutil.copytree(fake_data_dir / "mnist", fake_data_dir / "fashion-mnist")
    return fake_data_dir


def train_argv(model, data_dir, out, *extra):
    return ["train", model, "--dataset", "mnist", "--data-dir", str(data_dir), "--offline",
            "--train-split", "train[:96]", "--val-split", "test[:32]", "--test-split",
            "test[32:64]", "--batch-size", "32", "--epochs", "1", "--sample-epochs", "0",
            "--quiet", "--out", str(out), *TINY[model], *extra]


def assert_ok(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 0 and "Traceback" not in err, (argv, err)


def assert_one_line(capsys, argv, match):
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and "Traceback" not in err and match in errors[0], (argv, err)


def assert_png(path):
    with Image.open(path) as im:
        im.verify()


def test_every_offered_value_is_covered():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = {}
    for command, p in sub.choices.items():
        if command == "train":
            continue  # its options are the config fields, covered by offered_values
        for action in p._actions:
            if action.choices:
                name = action.option_strings[0] if action.option_strings else action.dest
                found[(command, name)] = set(action.choices)
    assert found == COMMAND_CHOICES


@pytest.mark.parametrize("model", ["vae", "gan", "flow", "diffusion"])
def test_every_training_option_value(model, both_data_dir, tmp_path, capsys):
    defaults = CONFIGS[model]()
    for name, value in offered_values(model):
        if getattr(defaults, name) == value and name != "offline":
            continue  # the default is what every other run here uses
        out = tmp_path / f"{name}-{value}"
        argv = train_argv(model, both_data_dir, out, *flag(name, value))
        possible, fix = NEEDS.get((name, value), (True, ""))
        if not possible:
            assert_one_line(capsys, argv, fix)
            assert not out.exists()
            continue
        assert_ok(capsys, argv)
        assert_png(out / "samples" / "epoch_001.png")
        assert_ok(capsys, ["report", str(out)])


@pytest.mark.parametrize("model,extra", [
    ("vae", []), ("gan", []), ("flow", []), ("flow", ["--arch", "mlp", "--hidden-dim", "32"]),
    # The recipe's options together (and the VampPrior), through every picture and score.
    ("vae", ["--iwae-k", "3", "--hidden-layers", "2", "--kl-warmup-steps", "2", "--prior",
             "vamp", "--num-pseudo-inputs", "5", "--lr-schedule", "cosine", "--patience", "1"]),
    ("flow", ["--dequantization", "variational", "--ema", "0.9"]),
    ("gan", ["--ema", "0.9"]),
    # The conv GAN with each loss and regulariser, averaged, through every command.
    ("gan", ["--arch", "conv", "--hidden-dim", "8", "--d-hidden-dim", "12", "--loss", "hinge",
             "--spectral-norm", "--ema", "0.9", "--num-blocks", "1"]),
    ("gan", ["--arch", "conv", "--hidden-dim", "8", "--loss", "wgan-gp", "--gp-weight", "5",
             "--r1-weight", "1", "--d-steps", "2", "--d-lr", "1e-3", "--minibatch-std"]),
    ("diffusion", []),  # its default --ema 0.999, elbo, eps, linear, ddpm at rho 3
    ("diffusion", ["--loss", "simple", "--parameterization", "v", "--schedule", "cosine",
                   "--sampler", "ddim", "--ema", "0", "--num-res-blocks", "2",
                   "--sample-rho", "0", "--sample-eta", "0.5"]),
])
def test_every_command_on_every_model(model, extra, fake_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert_ok(capsys, train_argv(model, fake_data_dir, run, *extra))
    pictures = []
    for checkpoint in ("best", "last"):
        common = ["--checkpoint", checkpoint, "--device", "cpu"]
        for method in ("cdf", "slerp"):
            pictures.append(tmp_path / f"i-{checkpoint}-{method}.png")
            assert_ok(capsys, ["interpolate", str(run), "--method", method, "--rows", "2",
                               "--steps", "3", "--out", str(pictures[-1]), *common])
        pictures.append(tmp_path / f"s-{checkpoint}.png")
        assert_ok(capsys, ["sample", str(run), "-n", "4", "--out", str(pictures[-1]), *common])
        if model == "diffusion":
            pictures.append(tmp_path / f"s3-{checkpoint}.png")
            assert_ok(capsys, ["sample", str(run), "-n", "4", "--sample-steps", "3", "--out",
                               str(pictures[-1]), *common])
            pictures.append(tmp_path / f"s-rho-{checkpoint}.png")
            assert_ok(capsys, ["sample", str(run), "-n", "4", "--sample-rho", "3", "--out",
                               str(pictures[-1]), *common])
            for sampler in ("ddim", "ddpm"):
                pictures.append(tmp_path / f"s-{sampler}-{checkpoint}.png")
                assert_ok(capsys, ["sample", str(run), "-n", "4", "--sampler", sampler,
                                   "--out", str(pictures[-1]), *common])
            pictures.append(tmp_path / f"s-eta-{checkpoint}.png")
            assert_ok(capsys, ["sample", str(run), "-n", "4", "--sampler", "ddim",
                               "--sample-eta", "0.3", "--out", str(pictures[-1]), *common])
        if model == "vae":
            pictures.append(tmp_path / f"m-{checkpoint}.png")
            assert_ok(capsys, ["manifold", str(run), "--size", "3", "--out",
                               str(pictures[-1]), *common])
        # A GAN's evaluation always scores samples: 100 of them, not 10000, keep this fast.
        assert_ok(capsys, ["evaluate", str(run), "--iw-samples", "3", "--json",
                           "--num-samples", "100", *common])
        assert_ok(capsys, ["evaluate", str(run), "--iw-samples", "3", "--no-naive",
                           "--dequant-samples", "2", "--time-samples", "2", "--num-samples",
                           "100", *common])
    assert_ok(capsys, ["evaluate", str(run), "--iw-samples", "3", "--sample-quality",
                       "--num-samples", "100", "--device", "auto"])
    scored = json.loads((run / "evaluation.json").read_text())
    assert any("samples=100)" in key and scored[key]["frechet"]["n_generated"] == 100
               for key in scored)
    # Samples drawn under bf16 autocast where the hardware has it, scored under their own key;
    # auto runs everywhere, in bf16 exactly where bf16 does.
    possible, fix = NEEDS[("precision", "bf16")]
    for precision in ("fp32", "bf16", "auto"):
        picture = tmp_path / f"s-{precision}.png"
        for argv in (["sample", str(run), "-n", "4", "--out", str(picture)],
                     ["evaluate", str(run), "--iw-samples", "3", "--time-samples", "2",
                      "--sample-quality", "--num-samples", "100"]):
            if precision == "bf16" and not possible:
                assert_one_line(capsys, [*argv, "--precision", precision], fix)
            else:
                assert_ok(capsys, [*argv, "--precision", precision])
        if possible or precision != "bf16":
            pictures.append(picture)
    keys = json.loads((run / "evaluation.json").read_text())
    assert any("precision=bf16)" in key for key in keys) == possible
    if model == "diffusion":  # its samples' scores at another number of steps, kept apart
        assert_ok(capsys, ["evaluate", str(run), "--time-samples", "2", "--sample-quality",
                           "--num-samples", "100", "--sample-steps", "2"])
        other = "ddpm" if "ddim" in extra else "ddim"
        assert_ok(capsys, ["evaluate", str(run), "--time-samples", "2", "--sample-quality",
                           "--num-samples", "100", "--sample-rho", "3", "--sampler", other])
        assert_ok(capsys, ["evaluate", str(run), "--time-samples", "2", "--sample-quality",
                           "--num-samples", "100", "--sampler", "ddim", "--sample-eta", "1"])
        keys = json.loads((run / "evaluation.json").read_text())
        assert any("sample steps=2)" in key for key in keys)
        assert any(f"sample rho=3, sampler={other})" in key for key in keys)
        assert any("sampler=ddim, sample eta=1)" in key for key in keys)
        assert_one_line(capsys, ["sample", str(run), "--npz", str(tmp_path / "r.npz"),
                                 "--sample-rho", "-1"], "--sample-rho must lie in 0..100")
        assert_one_line(capsys, ["sample", str(run), "--npz", str(tmp_path / "r.npz"),
                                 "--sampler", "ddim", "--sample-eta", "2"],
                        "--sample-eta must lie in 0..1")
        assert_one_line(capsys, ["sample", str(run), "--npz", str(tmp_path / "r.npz"),
                                 "--sampler", "ddpm", "--sample-eta", "0.5"],
                        "--sample-eta is DDIM's")
    else:
        for flag, value in (("--sample-steps", "2"), ("--sample-rho", "2"),
                            ("--sampler", "ddpm"), ("--sample-eta", "0.5")):
            assert_one_line(capsys, ["evaluate", str(run), flag, value], "for diffusion runs")
    if model in ("gan", "flow"):  # their samples at another prior spread, scored apart
        pictures.append(tmp_path / "s-t.png")
        assert_ok(capsys, ["sample", str(run), "-n", "4", "--temperature", "0.5", "--out",
                           str(pictures[-1])])
        assert_ok(capsys, ["evaluate", str(run), "--sample-quality", "--num-samples", "100",
                           "--temperature", "0.5", "--iw-samples", "3"])
        keys = json.loads((run / "evaluation.json").read_text())
        assert any("samples=100, temperature=0.5)" in key for key in keys)
        assert_one_line(capsys, ["sample", str(run), "--out", str(tmp_path / "t.png"),
                                 "--temperature", "nan"], "--temperature must lie in 0..100")
    else:
        assert_one_line(capsys, ["sample", str(run), "--out", str(tmp_path / "t.png"),
                                 "--temperature", "0.5"], "for GAN and flow runs")
    for command in ("sample", "interpolate", "manifold", "evaluate"):
        if command == "manifold" and model != "vae":
            continue
        argv = [command, str(run), "--device", "cuda"]
        argv += ["--out", str(tmp_path / "x.png")] if command != "evaluate" else []
        if not torch.cuda.is_available():
            assert_one_line(capsys, argv, "no CUDA GPU")
    # Packed into one file, it serves every command that reads a run; its samples score.
    for checkpoint in ("best", "last"):
        packed = tmp_path / f"{checkpoint}.safetensors"
        assert_ok(capsys, ["export", str(run), str(packed), "--checkpoint", checkpoint])
    pictures += [tmp_path / "p-s.png", tmp_path / "p-i.png"]
    assert_ok(capsys, ["sample", str(packed), "-n", "4", "--out", str(pictures[-2]),
                       "--npz", str(tmp_path / "s.npz")])
    assert_ok(capsys, ["interpolate", str(packed), "--rows", "2", "--steps", "3", "--out",
                       str(pictures[-1])])
    if model == "vae":
        pictures.append(tmp_path / "p-m.png")
        assert_ok(capsys, ["manifold", str(packed), "--size", "3", "--out", str(pictures[-1])])
    assert_ok(capsys, ["evaluate", str(packed), "--iw-samples", "3", "--num-samples", "100",
                       "--json"])
    assert_ok(capsys, ["report", str(packed), "--out", str(tmp_path / "p.html")])
    for device in ("auto", "cpu"):
        assert_ok(capsys, ["score", str(tmp_path / "s.npz"), "--dataset", "mnist",
                           "--data-dir", str(fake_data_dir), "--offline", "--split", "test[32:]",
                           "--train-split", "train[:96]", "--val-split", "test[:32]",
                           "--device", device, "--json"])
    if not torch.cuda.is_available():
        assert_one_line(capsys, ["score", str(tmp_path / "s.npz"), "--dataset", "mnist",
                                 "--device", "cuda"], "no CUDA GPU")
    for p in pictures:
        assert_png(p)
    assert_ok(capsys, ["report", str(run)])
    assert "<img" in (run / "report.html").read_text()


def test_data_list_and_check(fake_data_dir, real_data_dir, capsys):
    assert main(["data", "list", "--data-dir", str(fake_data_dir)]) == 0
    assert "train-images" in capsys.readouterr().out
    assert main(["data", "check", "--data-dir", str(real_data_dir)]) == 0
    assert "ok (10000, 28, 28)" in capsys.readouterr().out
    # Files that are not the published ones fail their checksum, in one line.
    assert_one_line(capsys, ["data", "check", "--data-dir", str(fake_data_dir)],
                    "failed the check")


def test_cosine_schedule_sets_each_epochs_learning_rate(fake_data_dir, tmp_path, monkeypatch):
    """The learning rate of every step in epoch e (0-based) of E is
    lr * (1 + cos(pi e / E)) / 2. Planted bug it catches: the factor one epoch ahead
    (``epoch + 1`` in _set_learning_rate)."""
    import math

    from test_cli import vae

    from dgm.models.vae import VAE

    seen = []
    real = VAE.training_step
    monkeypatch.setattr(VAE, "training_step", lambda self, x, opts: (
        seen.append(opts["adam"].param_groups[0]["lr"]), real(self, x, opts))[1])
    assert main(vae(fake_data_dir, tmp_path / "r", "--epochs", "4", "--lr", "0.002",
                    "--lr-schedule", "cosine")) == 0
    expected = [0.002 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4) for _ in range(6)]
    assert seen == pytest.approx(expected, rel=1e-12)  # 192 images, batches of 32: 6 steps


@pytest.mark.parametrize(("scores", "patience", "spent"), [
    ([1, 2, 3], 0, False),          # 0: never stop
    ([1, 2, 3], 3, False),          # not yet patience + 1 scores
    ([3, 2, 1], 2, True),           # two epochs without beating 3
    ([3, 2, 3], 2, True),           # equalling the best is no improvement
    ([3, 2, 3.5], 2, False),        # the last one improved
    ([1, 2, 3, 2.5], 2, False),     # only one epoch since the best
    ([1, 3, 2, 2.5], 2, True),
])
def test_patience_spent_on_hand_made_histories(scores, patience, spent):
    """Planted bugs it catches: ``<`` for ``<=`` (an equal score counting as progress), and
    one epoch too many before stopping (``len(scores) <= patience + 1``)."""
    from dgm.train import _patience_spent

    history = [{"epoch": i + 1, "val_elbo": s} for i, s in enumerate(scores)]
    assert _patience_spent(history, ("val_elbo", "max"), patience) is spent
    # The same for a metric to minimise, mirrored.
    low = [{"epoch": r["epoch"], "val_bpd": -r["val_elbo"]} for r in history]
    assert _patience_spent(low, ("val_bpd", "min"), patience) is spent


def test_patience_stops_at_the_right_epoch(fake_data_dir, tmp_path, monkeypatch):
    """With validation scores 1, 2, 3, 2.5, 2.9, ... and --patience 2 training stops after
    epoch 5, the second without beating 3. Planted bug it catches: patience never checked
    in the loop (``stop = False`` after each epoch), which runs all 8 epochs."""
    from test_cli import vae

    from dgm.models.vae import VAE
    from dgm.runs import load_checkpoint, read_metrics

    scores = iter([1.0, 2.0, 3.0, 2.5, 2.9, 4.0, 5.0, 6.0])
    monkeypatch.setattr(VAE, "validation_step",
                        lambda self, x: {"val_elbo": torch.tensor(next(scores))})
    run = tmp_path / "r"
    assert main(vae(fake_data_dir, run, "--epochs", "8", "--patience", "2")) == 0
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 5
    assert load_checkpoint(run / "checkpoints" / "best.pt")["epoch"] == 3


def test_threads_of_the_commands_after_training(fake_data_dir, tmp_path, capsys, monkeypatch):
    """--threads N (evaluate, sample, score, interpolate, manifold): torch runs N threads
    while the command works and its earlier count after; out of range is a one-line error."""
    import dgm.evaluate

    run = tmp_path / "run"
    assert_ok(capsys, train_argv("vae", fake_data_dir, run))
    seen, real = [], dgm.evaluate.evaluate_run
    monkeypatch.setattr(dgm.evaluate, "evaluate_run",
                        lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    before = torch.get_num_threads()
    for n in (1, 2):
        assert_ok(capsys, ["evaluate", str(run), "--iw-samples", "3", "--json", "--threads",
                           str(n)])
        assert torch.get_num_threads() == before
    assert seen == [1, 2]
    assert_ok(capsys, ["sample", str(run), "-n", "4", "--threads", "1",
                       "--out", str(tmp_path / "s.png")])
    assert_one_line(capsys, ["evaluate", str(run), "--threads", "-1"], "--threads must lie")

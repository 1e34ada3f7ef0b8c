"""Your own model, named by import path, gets the whole run tooling: train, resume,
pictures, evaluate --sample-quality, sample and report."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from dgm.cli import main
from dgm.config import TrainConfig, opt
from dgm.models import GenerativeModel
from dgm.runs import load_checkpoint, read_metrics

README = Path(__file__).resolve().parents[1] / "README.md"


class Toy(nn.Module):
    """A per-pixel Gaussian with a learned mean image: the smallest thing that trains."""

    @dataclasses.dataclass
    class Config(TrainConfig):
        noise: float = opt(0.1, "standard deviation of the samples' noise", min=0.0)

    curves = {"loss": ["train_loss", "val_loss"]}
    best_metric = ("val_loss", "min")

    def __init__(self, image_shape, noise):
        super().__init__()
        self.image_shape, self.noise = image_shape, noise
        self.mean = nn.Parameter(torch.zeros(image_shape))

    @classmethod
    def from_config(cls, cfg, image_shape):
        return cls(image_shape, cfg.noise)

    @staticmethod
    def prepare(x, generator=None):
        return x.float() / 255

    def configure_optimizers(self, cfg):
        return {"adam": torch.optim.Adam(self.parameters(), lr=cfg.lr)}

    def training_step(self, x, optimizers):
        loss = (x - self.mean).square().mean()
        optimizers["adam"].zero_grad()
        loss.backward()
        optimizers["adam"].step()
        return {"train_loss": loss.detach()}

    def validation_step(self, x):
        return {"val_loss": (x - self.mean).square().mean()}

    def sample(self, n, generator=None):
        eps = torch.randn(n, *self.image_shape, generator=generator, device=self.mean.device)
        return (self.mean + self.noise * eps).clamp(0, 1)


class NotAModel:
    pass


def data_flags(fake_data_dir):
    return ["--dataset", "mnist", "--data-dir", str(fake_data_dir), "--offline",
            "--batch-size", "32", "--quiet", "--sample-epochs", "0"]


def test_toy_follows_the_protocol():
    assert isinstance(Toy((1, 28, 28), 0.1), GenerativeModel)


def test_own_model_trains_resumes_evaluates_and_reports(fake_data_dir, tmp_path, capsys,
                                                         monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = tmp_path / "run"
    argv = ["train", "--model", "test_own_model:Toy", "--out", str(run), "--lr", "0.01",
            "--noise", "0.2", *data_flags(fake_data_dir)]
    assert main([*argv, "--epochs", "1"]) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"] == "test_own_model:Toy" and cfg["noise"] == 0.2
    assert main([*argv, "--epochs", "2", "--resume", str(run)]) == 0
    # The resumed run ends where an uninterrupted one ends (planted bug it catches: the
    # optimisers' states not restored on resume).
    whole = tmp_path / "whole"
    assert main([*argv[:4], str(whole), *argv[5:], "--epochs", "2"]) == 0
    a, b = (load_checkpoint(r / "checkpoints" / "last.pt")["state_dict"] for r in (run, whole))
    torch.testing.assert_close(a["mean"], b["mean"], rtol=0, atol=0)
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["val_loss"] < rows[0]["val_loss"]
    for f in ("checkpoints/last.pt", "checkpoints/best.pt", "curves.png",
              "samples/epoch_000.png", "samples/epoch_002.png"):
        assert (run / f).is_file(), f

    assert main(["evaluate", str(run), "--sample-quality", "--json", "--offline"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["model"] == "test_own_model:Toy" and res["frechet"]["distance"] >= 0
    assert main(["sample", str(run), "-n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert "test_own_model:Toy" in html and "frechet" in html


def one_line_error(capsys, argv, match):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("dgm: error:") and match in err, err


@pytest.mark.parametrize("path, match", [
    ("no_such_module:Model", "cannot import no_such_module for model no_such_module:Model"),
    ("test_own_model:Missing", "test_own_model has no class Missing"),
    ("test_own_model:NotAModel", "it lacks from_config, prepare"),
    ("test_own_model", "unknown model 'test_own_model'"),
])
def test_bad_import_path_gives_one_line(path, match, fake_data_dir, tmp_path, capsys):
    one_line_error(capsys, ["train", "--model", path, "--out", str(tmp_path / "r"),
                            *data_flags(fake_data_dir)], match)


def test_readme_example_model_trains(fake_data_dir, tmp_path, monkeypatch):
    """The README's complete minimal model, as written there."""
    text = README.read_text()
    code = re.search(r"```python\n(from dataclasses.*?class MeanImage.*?)```", text, re.S).group(1)
    assert len(code.splitlines()) < 40
    (tmp_path / "mymodel.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    assert main(["train", "--model", "mymodel:MeanImage", "--out", str(run), "--epochs", "1",
                 *data_flags(fake_data_dir)]) == 0
    assert read_metrics(run)[0]["val_loss"] > 0


def test_validation_metrics_are_means_over_images_in_unequal_batches():
    """The trainer validates in batches of max(batch size, 500) and weights each batch's
    numbers by its images: 700 images are 500 + 200, and the reported mean is the mean over
    all 700 (planted bug: batches' values summed unweighted)."""
    from dgm.distributed import Context
    from dgm.train import _validate

    class Means(nn.Module):
        def validation_step(self, x):
            return {"val_mean": x.mean(), "val_max": x.flatten(1).amax(1).mean()}

    x = torch.rand(700, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x[500:] += 1  # the second batch differs, so a wrong weighting shows
    got = _validate(Means(), x, TrainConfig(batch_size=64), "cpu", Context())
    assert got["val_mean"] == pytest.approx(x.mean().item(), rel=1e-6)
    assert got["val_max"] == pytest.approx(x.flatten(1).amax(1).mean().item(), rel=1e-6)

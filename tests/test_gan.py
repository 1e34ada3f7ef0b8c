"""The GAN: architecture, losses, updates, learning, interpolation and the command line."""

import json

import pytest
import torch

from dgm import GAN
from dgm.cli import main
from dgm.config import GANConfig
from dgm.data import load_split
from dgm.features import SHIPPED, extract_features, shipped_feature_net
from dgm.interpolation import interpolate, interpolation_rows
from dgm.models.gan import Discriminator, Generator, discriminator_loss, generator_loss
from dgm.quality import frechet_distance
from dgm.runs import load_checkpoint


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_shapes_and_parameter_counts():
    gan = GAN()
    z = torch.randn(7, 100)
    assert gan.generate(z).shape == (7, 1, 28, 28)
    assert gan.discriminate(torch.rand(7, 1, 28, 28)).shape == (7,)
    # 100->128 (no BatchNorm), 128->256, 256->512, 512->1024 (each + BatchNorm), 1024->784.
    g = (100 * 128 + 128) + (128 * 256 + 256 + 2 * 256) + (256 * 512 + 512 + 2 * 512) \
        + (512 * 1024 + 1024 + 2 * 1024) + (1024 * 784 + 784)
    d = (784 * 512 + 512) + (512 * 256 + 256) + (256 + 1)
    assert n_params(gan.generator) == g == 1_510_032
    assert n_params(gan.discriminator) == d == 533_505
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in gan.generator.modules()) == 3
    assert sum(isinstance(m, torch.nn.Dropout) for m in gan.discriminator.modules()) == 2
    x = gan.sample(5)
    assert x.shape == (5, 1, 28, 28) and x.min() >= 0 and x.max() <= 1


def test_the_reports_architecture_by_default():
    """The report's widths, slopes and dropout, for the classes' own defaults too (mutation
    testing found these unchecked: a LeakyReLU slope of 0.4 or dropout 0.6 passed)."""
    g, d = Generator(), Discriminator()
    assert g(torch.randn(3, 100)).shape == (3, 784) and d(torch.rand(3, 784)).shape == (3,)
    slopes = [m.negative_slope for m in (*g.modules(), *d.modules())
              if isinstance(m, torch.nn.LeakyReLU)]
    assert slopes == [0.2] * 6
    assert [m.p for m in d.modules() if isinstance(m, torch.nn.Dropout)] == [0.3, 0.3]
    assert GAN.from_config(GANConfig()).image_shape == (1, 28, 28)


def test_losses_are_the_reports_formulas():
    """Against -log D(x) - log(1 - D(G(z))), -log D(G(z)) and log(1 - D(G(z))) written
    with sigmoid. Planted bugs they catch: a sign or a + turned into - in either loss."""
    real, fake = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    d_real, d_fake = torch.sigmoid(real), torch.sigmoid(fake)
    torch.testing.assert_close(discriminator_loss(real, fake),
                               (-d_real.log() - (1 - d_fake).log()).mean())
    torch.testing.assert_close(generator_loss(fake), -d_fake.log().mean())
    torch.testing.assert_close(generator_loss(fake, saturating=True), (1 - d_fake).log().mean())


def test_validation_step_by_hand():
    """The validation numbers recomputed from D's logits at the same z."""
    gan = GAN().eval()
    x = torch.rand(10, 1, 28, 28) * 2 - 1
    # D's bias moved so that half the fakes' logits fall below 0: both terms of the
    # accuracy count (an untrained D may call every fake real).
    torch.manual_seed(4)
    with torch.no_grad():
        fake = gan.discriminator(gan.generator(torch.randn(10, 100)))
        gan.discriminator.net[-1].bias -= fake.median()
    torch.manual_seed(4)
    val = gan.validation_step(x)
    torch.manual_seed(4)
    with torch.no_grad():
        real = gan.discriminator(x)
        fake = gan.discriminator(gan.generator(torch.randn(10, 100)))
    acc = ((real > 0).sum() + (fake < 0).sum()).item() / 20
    assert val["val_d_acc"].item() == pytest.approx(acc)
    torch.testing.assert_close(val["val_d_loss"], discriminator_loss(real, fake))
    torch.testing.assert_close(val["val_d_real"], torch.sigmoid(real).mean())
    torch.testing.assert_close(val["val_d_fake"], torch.sigmoid(fake).mean())
    assert 0 < (fake < 0).sum() < 10


def test_prepare_maps_to_tanh_range():
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1)
    assert GAN.prepare(x).flatten().tolist() == [-1.0, 1.0]


def test_non_saturating_gradient_survives_where_saturating_vanishes():
    # D(G(z)) = sigmoid(-10) ~ 4.5e-5: D confidently rejects the fakes, as early in training.
    logits = torch.full((8,), -10.0, requires_grad=True)
    (g_ns,) = torch.autograd.grad(generator_loss(logits), logits)
    (g_sat,) = torch.autograd.grad(generator_loss(logits, saturating=True), logits)
    assert g_ns.abs().sum() > 0.99  # ~ (1 - D) per image, averaged over the batch
    assert g_sat.abs().sum() < 1e-4  # ~ D: the generator learns nothing (report 2.4)


def test_one_training_step_changes_both_networks():
    gan = GAN()
    opts = gan.configure_optimizers(GANConfig())
    before = {k: v.clone() for k, v in gan.state_dict().items()}
    # D is frozen for G's update: its weights get one gradient a step, from its own loss.
    grads = []
    gan.discriminator.net[0].weight.register_hook(lambda g: grads.append(g))
    out = gan.training_step(torch.rand(16, 1, 28, 28) * 2 - 1, opts)
    assert len(grads) == 1
    assert set(out) == {"d_loss", "g_loss", "d_real", "d_fake"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    for net in ("generator", "discriminator"):
        changed = [k for k, v in gan.state_dict().items()
                   if k.startswith(net) and "weight" in k and not torch.equal(v, before[k])]
        assert changed, f"{net} did not change"
    # D was frozen only for G's update and is trainable again.
    assert all(p.requires_grad for p in gan.discriminator.parameters())
    val = gan.eval().validation_step(torch.rand(10, 1, 28, 28) * 2 - 1)
    assert 0 <= val["val_d_acc"] <= 1


def test_tiny_gan_lowers_frechet_score(real_data_dir):
    x, y = load_split("mnist", "test[:2000]", real_data_dir)
    net, _ = shipped_feature_net("mnist")
    ref = extract_features(net, load_split("mnist", "test[9000:9500]", real_data_dir)[0])
    gan = GAN()
    opts = gan.configure_optimizers(GANConfig())
    data = GAN.prepare(x)

    def score() -> float:
        gan.eval()
        gen = torch.Generator().manual_seed(0)
        return frechet_distance(ref, extract_features(net, gan.sample(500, generator=gen)))

    before = score()
    gan.train()
    for _ in range(3):  # ~90 steps with the default optimiser
        for idx in torch.randperm(len(data)).split(64)[:-1]:
            gan.training_step(data[idx], opts)
    after = score()
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("method", ["cdf", "slerp"])
def test_interpolation_endpoints_are_exact(method):
    a, b = torch.randn(100), torch.randn(100) * 3
    path = interpolate(a, b, 9, method)
    assert path.shape == (9, 100)
    assert torch.equal(path[0], a) and torch.equal(path[-1], b)
    assert torch.isfinite(path).all()
    rows = interpolation_rows(4, 5, (3, 2), method, torch.Generator().manual_seed(1))
    rows = rows.view(4, 5, 3, 2)
    assert torch.equal(rows[1:, 0], rows[:-1, -1])  # each row starts where the last ended


def test_interpolation_paths_are_what_they_claim():
    a, b = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    u = torch.special.ndtr(interpolate(a, b, 7, "cdf"))
    # Equidistant in the unit cube: constant differences of Phi(z).
    assert torch.allclose(u.diff(dim=0), (u[-1] - u[0]) / 6, atol=1e-9)
    s = interpolate(a / a.norm(), b / b.norm(), 7, "slerp")
    assert torch.allclose(s.norm(dim=1), torch.ones(7, dtype=torch.float64))
    with pytest.raises(ValueError):
        interpolate(a, b, 1)


def test_cli_end_to_end(real_data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    data = ["--data-dir", str(real_data_dir)]
    assert main(["train", "gan", "--dataset", "mnist", "--train-split", "test[:256]",
                 "--val-split", "test[8000:8128]", "--test-split", "test[9000:9200]",
                 "--epochs", "2", "--sample-epochs", "0,2", "--out", str(run), "--quiet",
                 *data]) == 0
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"d_loss", "g_loss", "d_real", "d_fake", "val_d_acc"} <= set(header)
    assert (run / "samples" / "epoch_000.png").is_file()
    assert (run / "samples" / "epoch_002.png").is_file()
    assert (run / "curves.png").is_file()

    assert main(["evaluate", str(run), "--json", "--quiet", *data]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["frechet"]["distance"] > results["frechet"]["real_reference"]
    assert 0.8 <= results["features"]["test_accuracy"] <= 1
    assert results["features"]["sha256"] == SHIPPED["mnist"].sha256
    for score in ("frechet", "kid", "precision_recall"):
        assert results[score]["features"].startswith(SHIPPED["mnist"].name)
    assert "weak" in results["parzen"]["note"]
    saved = json.loads((run / "evaluation.json").read_text())
    assert [v["model"] for v in saved.values()] == ["gan"]

    for method in ("cdf", "slerp"):
        out = tmp_path / f"interp_{method}.png"
        assert main(["interpolate", str(run), "--rows", "3", "--steps", "4", "--method", method,
                     "--out", str(out), "--device", "cpu"]) == 0
        assert out.is_file()
    assert main(["sample", str(run), "-n", "9", "--out", str(tmp_path / "s.png")]) == 0


def test_interpolate_rejects_a_model_without_latent_space(tmp_path, capsys, monkeypatch):
    assert main(["interpolate", str(tmp_path / "none"), "--out", "x.png"]) == 1
    assert "not a dgm run folder" in capsys.readouterr().err

    class NoLatent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

    monkeypatch.setattr("dgm.evaluate.load_model",
                        lambda *a, **k: ("flow", None, NoLatent(), None))
    code = main(["interpolate", str(tmp_path), "--out", str(tmp_path / "i.png")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "cannot be interpolated" in err


def test_resumed_gan_run_equals_uninterrupted_run(real_data_dir, tmp_path):
    common = ["--dataset", "mnist", "--train-split", "test[:256]", "--val-split",
              "test[8000:8128]", "--sample-epochs", "0", "--quiet", "--data-dir",
              str(real_data_dir)]
    assert main(["train", "gan", *common, "--epochs", "2", "--out", str(tmp_path / "a")]) == 0
    assert main(["train", "gan", *common, "--epochs", "1", "--out", str(tmp_path / "b")]) == 0
    assert main(["train", "gan", *common, "--epochs", "2", "--resume", str(tmp_path / "b")]) == 0
    # Both networks, both optimisers and the noise stream are restored: the same metrics and
    # the same weights. Planted bug it catches: ``opt.load_state_dict`` skipped on resume.
    assert (tmp_path / "a" / "metrics.csv").read_text().splitlines()[2].split(",")[:-1] == \
        (tmp_path / "b" / "metrics.csv").read_text().splitlines()[2].split(",")[:-1]
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("flags", [["--rows", "0"], ["--steps", "1"], ["--out", "x.jpg"]])
def test_interpolate_bad_flags_are_one_line_errors(flags, tmp_path, capsys):
    code = main(["interpolate", str(tmp_path), "--out", str(tmp_path / "i.png"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and err.startswith("dgm: error:")

"""--precision bf16: accepted where the hardware has native bf16, refused in one line where
not, and what is cited stays fp32 under autocast."""

import math

import numpy as np
import pytest
import torch
from test_cli import one_line_error, vae
from test_flow import flat_jacobian_logdets, perturbed

import dgm.distributed
from dgm.cli import main
from dgm.distributed import cpu_has_native_bf16
from dgm.models import GAN, VAE, RealNVP
from dgm.runs import read_metrics, read_yaml


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_native_bf16_is_read_from_the_cpu_flags():
    assert cpu_has_native_bf16("flags : fpu sse avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_has_native_bf16("flags : fpu amx_bf16 amx_tile\n")
    assert not cpu_has_native_bf16("flags : fpu sse avx2 avx512f avx512bw\n")  # emulated
    assert not cpu_has_native_bf16("")


def test_bf16_is_refused_on_a_cpu_without_it(fake_data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dgm.distributed, "cpu_has_native_bf16", lambda: False)
    one_line_error(capsys, 1, vae(fake_data_dir, tmp_path / "r", "--precision", "bf16",
                                  "--device", "cpu"), "needs native bf16 (AVX512-BF16 or AMX)")
    assert not (tmp_path / "r").exists()


TINY = {"vae": ["--hidden-dim", "32"], "gan": ["--latent-dim", "8"],
        "flow": ["--hidden-dim", "8", "--num-couplings", "1", "--num-scales", "1"]}


@pytest.mark.parametrize("model", list(TINY))
def test_every_model_trains_in_bf16_where_the_cpu_has_it(model, fake_data_dir, tmp_path,
                                                         monkeypatch):
    """Run on any CPU (bf16 is emulated where it is not native, which is only slower). The
    same run in fp32 ends near it but not on it, so the networks did run in bf16 (planted
    bug: the trainer's autocast given "fp32" whatever --precision says)."""
    monkeypatch.setattr(dgm.distributed, "cpu_has_native_bf16", lambda: True)
    rows = {}
    for precision in ("bf16", "fp32"):
        run = tmp_path / precision
        assert main(["train", model, "--dataset", "mnist", "--data-dir", str(fake_data_dir),
                     "--offline", "--train-split", "train[:128]", "--val-split", "test[:64]",
                     "--epochs", "2", "--batch-size", "32", "--sample-epochs", "", "--quiet",
                     "--precision", precision, "--device", "cpu", "--out", str(run),
                     *TINY[model]]) == 0
        rows[precision] = read_metrics(run)
    assert len(rows["bf16"]) == 2
    assert all(math.isfinite(v) for r in rows["bf16"] for v in r.values())
    bf16, fp32 = ({k: v for k, v in rows[p][0].items() if k != "time_s"}
                  for p in ("bf16", "fp32"))
    assert bf16 != fp32
    for k, v in fp32.items():
        assert bf16[k] == pytest.approx(v, rel=0.05, abs=0.05), k


@pytest.mark.parametrize("arch", ["conv", "mlp"])
def test_flow_under_bf16_autocast_is_one_bijection_with_an_exact_logdet(arch):
    """Planted bug: the conditioner's bf16 output used as it is: the log-det is then a bf16
    sum, off from the Jacobian's by about 1e-2 here."""
    model = perturbed(RealNVP(arch, (1, 4, 4), hidden_dim=8, num_blocks=1, num_couplings=2,
                              num_scales=1), torch.float32)
    x = RealNVP.prepare(torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8))
    with bf16():
        z, ld = model(x)
        x_back, ld_back = model.inverse(z)
        jacobian = flat_jacobian_logdets(model, x)
    assert z.dtype == ld.dtype == torch.float32
    torch.testing.assert_close(x_back, x, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ld_back, -ld, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ld, jacobian, atol=1e-3, rtol=1e-5)
    with torch.no_grad():
        fp32 = model(x)[1]
    assert not torch.equal(ld, fp32)  # the networks did run in bf16


def test_vae_and_gan_cite_fp32_under_bf16_autocast():
    """Planted bugs: the encoder's or the decoder's bf16 output used as it is (the KL term,
    whose closed form is not autocast, is then computed in bf16)."""
    torch.manual_seed(0)
    vae_model, x = VAE(latent_dim=4, hidden_dim=32), (torch.rand(8, 1, 28, 28) < 0.5).float()
    with torch.no_grad():
        torch.manual_seed(1)
        exact = vae_model.elbo(x)
        with bf16():
            torch.manual_seed(1)  # the same reparameterisation noise
            half = vae_model.elbo(x)
            bound = vae_model.iwae_bound(x, 3)
            mu, logvar = vae_model.encode(x)
            logits = vae_model.decode(mu)
    assert half.dtype == bound.dtype == torch.float32
    assert mu.dtype == logvar.dtype == logits.dtype == torch.float32
    torch.testing.assert_close(half, exact, rtol=2e-3, atol=0)  # bf16 networks, fp32 sums
    gan = GAN(latent_dim=8)
    with torch.no_grad(), bf16():
        assert gan.discriminator(torch.rand(4, 784) * 2 - 1).dtype == torch.float32


def test_samples_are_drawn_in_bf16_on_request(fake_data_dir, tmp_path, monkeypatch):
    """`dgm sample --precision bf16` runs the generator in bf16: the same noise gives images
    close to fp32's and not equal to them (planted bug: the option ignored)."""
    monkeypatch.setattr(dgm.distributed, "cpu_has_native_bf16", lambda: True)
    run = tmp_path / "r"
    assert main(["train", "gan", "--dataset", "mnist", "--data-dir", str(fake_data_dir),
                 "--offline", "--train-split", "train[:64]", "--val-split", "test[:32]",
                 "--epochs", "1", "--sample-epochs", "", "--quiet", "--device", "cpu",
                 "--out", str(run), *TINY["gan"]]) == 0
    images = {}
    for precision in ("fp32", "bf16"):
        npz = tmp_path / f"{precision}.npz"
        assert main(["sample", str(run), "-n", "32", "--npz", str(npz), "--device", "cpu",
                     "--precision", precision]) == 0
        images[precision] = np.load(npz)["samples"]
    diff = np.abs(images["bf16"] - images["fp32"])
    assert 0 < diff.mean() < 0.02 and diff.max() < 0.2, (diff.mean(), diff.max())


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_exactly_where_it_is_native(native, fake_data_dir, tmp_path,
                                                           monkeypatch):
    """--precision auto (what the GAN and diffusion recipes give) trains, records and samples in
    bf16 where the CPU has it natively and in fp32 elsewhere: its run equals one given that
    precision outright. Planted bugs: "auto" kept in config.yaml; auto always fp32."""
    monkeypatch.setattr(dgm.distributed, "cpu_has_native_bf16", lambda: native)
    meant = "bf16" if native else "fp32"
    images = {}
    for precision in ("auto", meant):
        run = tmp_path / precision
        assert main(["train", "gan", "--dataset", "mnist", "--data-dir", str(fake_data_dir),
                     "--offline", "--train-split", "train[:64]", "--val-split", "test[:32]",
                     "--epochs", "1", "--sample-epochs", "", "--quiet", "--device", "cpu",
                     "--precision", precision, "--out", str(run), *TINY["gan"]]) == 0
        assert read_yaml(run / "config.yaml")["precision"] == meant
        npz = tmp_path / f"{precision}.npz"
        assert main(["sample", str(run), "-n", "32", "--npz", str(npz), "--device", "cpu",
                     "--precision", precision]) == 0
        rows = [{k: v for k, v in r.items() if k != "time_s"} for r in read_metrics(run)]
        images[precision] = (rows, np.load(npz)["samples"])
    assert images["auto"][0] == images[meant][0]
    assert np.array_equal(images["auto"][1], images[meant][1])

import pytest
import torch

from dgm import VAE
from dgm.data import binarize, load_split
from dgm.maths import kl_std_normal


@pytest.fixture(scope="module")
def real_binary(real_data_dir):
    x, _ = load_split("mnist", "test[:600]", real_data_dir, offline=True)
    return binarize(x, torch.Generator().manual_seed(0))


def _train(model, x, steps, lr=2e-3, batch=100):
    opt = model.configure_optimizers(type("C", (), {"lr": lr}))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        model.training_step(x[idx], opt)
    return model


@pytest.fixture(scope="module")
def trained(real_binary):
    torch.manual_seed(0)
    model = VAE(latent_dim=8, hidden_dim=128)
    start = model.elbo(real_binary[500:]).mean().item()
    _train(model, real_binary[:500], steps=300)
    return model.eval(), start


def test_shapes_and_kl_term():
    vae = VAE(latent_dim=3, hidden_dim=16)
    x = torch.bernoulli(torch.full((4, 1, 28, 28), 0.5))
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (4, 3)
    assert vae.decode(mu).shape == (4, 784)
    rec, kl = vae(x)
    torch.testing.assert_close(kl, kl_std_normal(mu, logvar))
    assert (kl >= 0).all() and (rec <= 0).all()
    assert vae.sample(5).shape == (5, 1, 28, 28)
    with pytest.raises(ValueError, match="latent_dim 2"):
        vae.manifold(4)


def test_manifold_grid_uses_inverse_normal_cdf():
    vae = VAE(latent_dim=2, hidden_dim=8)
    seen = []
    vae.decoder.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    assert vae.manifold(4).shape == (16, 1, 28, 28)
    z = seen[0]
    u = torch.tensor([0.125, 0.375, 0.625, 0.875])
    torch.testing.assert_close(z[:4, 0], torch.special.ndtri(u))  # first row: z1 rises
    torch.testing.assert_close(z[::4, 1], torch.special.ndtri(u).flip(0))  # z2 falls downwards


def test_tiny_vae_learns(trained, real_binary):
    model, start = trained
    end = model.elbo(real_binary[500:]).mean().item()
    assert end > start + 150, (start, end)  # about -545 -> -200 nats on held-out images


def test_iwae_bounds_order_and_rise_with_k(trained, real_binary):
    model, _ = trained
    x = real_binary[500:]
    torch.manual_seed(1)
    elbo = torch.stack([model.elbo(x) for _ in range(20)]).mean(0)  # (B,), low-noise ELBO
    means = {k: model.log_likelihood(x, k)[0] for k in (1, 10, 100, 1000)}
    # IWAE_1 is an unbiased estimate of the ELBO; IWAE_k rises (weakly) with k, all >= ELBO.
    assert means[1].mean().item() == pytest.approx(elbo.mean().item(), abs=1.0)
    assert elbo.mean() < means[10].mean() < means[100].mean() < means[1000].mean()
    assert (means[1000] >= elbo - 1e-3).float().mean() > 0.95


def test_naive_estimate_converges_badly(trained, real_binary):
    model, _ = trained
    x = real_binary[500:520]
    iwae, iwae_se, iwae_ess = model.log_likelihood(x, 500, "posterior")
    naive, naive_se, naive_ess = model.log_likelihood(x, 500, "prior")
    assert naive_se.mean() > 10 * iwae_se.mean()
    assert naive_ess.mean() < 5 < iwae_ess.mean()
    assert naive.mean() < iwae.mean()  # the prior rarely proposes z that explain x


def test_log_likelihood_rejects_unknown_proposal():
    with pytest.raises(ValueError, match="proposal"):
        VAE(2, 8).log_likelihood(torch.zeros(1, 1, 28, 28), 2, "uniform")

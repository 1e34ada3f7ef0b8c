import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from dgm import VAE
from dgm.data import binarize, load_split


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
    """Planted bug it catches: the noise scaled by the variance, z = mu + exp(logvar) eps
    (report eq. 32), which the former ``kl == kl_std_normal(mu, logvar)`` let through."""
    vae = VAE(latent_dim=3, hidden_dim=16)
    x = torch.bernoulli(torch.full((4, 1, 28, 28), 0.5))
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (4, 3)
    assert vae.decode(mu).shape == (4, 784)
    torch.manual_seed(5)
    rec, kl = vae(x)
    # By hand, not through dgm.maths (which forward calls): the closed-form KL and the
    # Bernoulli log-likelihood at z = mu + sigma eps, the same eps.
    torch.manual_seed(5)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    torch.testing.assert_close(kl, 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(-1))
    torch.testing.assert_close(rec, Bernoulli(logits=vae.decode(z)).log_prob(x.flatten(1)).sum(-1))
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


# Beyond the report: deeper nets, the IWAE objective, the VampPrior, KL warm-up.

def _vamp(**kw):
    torch.manual_seed(0)
    return VAE(latent_dim=3, hidden_dim=16, prior="vamp", num_pseudo_inputs=7, **kw)


def test_vamp_prior_density_matches_torch_distributions():
    model = _vamp().double()
    z = torch.randn(5, 4, 3, dtype=torch.float64)
    # The components are the encoder's q(z|u_k) at the pseudo-images u_k = sigmoid(logits),
    # built here by hand, not from prior_params (planted bug: the sigmoid dropped there).
    mu, logvar = model.encode(torch.sigmoid(model.pseudo_logits))
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=torch.zeros(7, dtype=torch.float64)),
        torch.distributions.Independent(torch.distributions.Normal(mu, (0.5 * logvar).exp()), 1))
    torch.testing.assert_close(model.log_prior(z), mixture.log_prob(z))
    gaussian = VAE(latent_dim=3, hidden_dim=16).double()
    normal = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(3, dtype=torch.float64), 1.0), 1)
    torch.testing.assert_close(gaussian.log_prior(z), normal.log_prob(z))


def test_kl_is_closed_form_for_gaussian_and_monte_carlo_for_vamp():
    x = torch.bernoulli(torch.full((6, 1, 28, 28), 0.3))
    # The N(0, I) prior: closed form, so the same value whatever the noise.
    gaussian = VAE(latent_dim=3, hidden_dim=16)
    with torch.no_grad():  # q(z|x) far from the prior (an untrained one is within 0.2 nats)
        gaussian.encoder[-1].bias.copy_(torch.tensor([1.5, -1.0, 0.5, -1.0, 0.5, -2.0]))
    mu, logvar = gaussian.encode(x)
    closed = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1)
    assert closed.min() > 1.0
    torch.testing.assert_close(gaussian(x)[1], closed)
    # Its one-sample Monte-Carlo KL (as the IWAE terms compute it) averages to the closed
    # form, within 4 of its standard errors (2-3 % of it here).
    torch.manual_seed(1)
    _, log_ratio = gaussian._iwae_terms(x, 20000)
    err = log_ratio.std(0) / 20000**0.5
    assert ((-log_ratio.mean(0) - closed).abs() < 4 * err).all()
    # The VampPrior has no closed form: the KL is log q(z|x) - log p(z) at the sampled z,
    # so it varies with the noise, and equals the IWAE terms' ratio at k = 1, same noise.
    vamp = _vamp()
    torch.manual_seed(2)
    rec, kl = vamp(x)
    torch.manual_seed(2)
    rec1, log_ratio1 = vamp._iwae_terms(x, 1)
    torch.testing.assert_close(rec, rec1[0])
    torch.testing.assert_close(kl, -log_ratio1[0])
    assert not torch.allclose(vamp(x)[1], kl)


@pytest.mark.parametrize("prior", ["gaussian", "vamp"])
def test_iwae_objective_is_the_elbo_at_k1_and_rises_with_k(prior, real_binary):
    """At k = 1 the bound is the one-sample ELBO computed by hand with torch.distributions.
    Planted bug it catches: log q(z|x) halved in _log_weights (the former check compared
    iwae_bound with the same _iwae_terms it is built from)."""
    torch.manual_seed(0)
    model = VAE(latent_dim=4, hidden_dim=32, prior=prior, num_pseudo_inputs=10)
    x = real_binary[:50]
    with torch.no_grad():
        torch.manual_seed(3)
        k1 = model.iwae_bound(x, 1)
        # The one-sample ELBO by hand, at the same draw: log p(x|z) + log p(z) - log q(z|x).
        torch.manual_seed(3)
        mu, logvar = model.encode(x)
        q = Normal(mu, torch.exp(0.5 * logvar))
        z = mu + q.scale * torch.randn(1, *mu.shape)[0]
        rec = Bernoulli(logits=model.decode(z)).log_prob(x.flatten(1)).sum(-1)
        torch.testing.assert_close(k1, rec + model.log_prior(z) - q.log_prob(z).sum(-1))
        means = [torch.stack([model.iwae_bound(x, k) for _ in range(20)]).mean().item()
                 for k in (1, 10, 100)]
    assert means[0] < means[1] < means[2], means
    elbo = torch.stack([model.elbo(x) for _ in range(200)]).mean().item()
    assert abs(elbo - means[0]) < 1.0  # the same bound, estimated two ways


@pytest.mark.parametrize("kw", [dict(prior="vamp", num_pseudo_inputs=20),
                                dict(iwae_k=5, hidden_layers=2),
                                dict(iwae_k=3, prior="vamp", kl_warmup_steps=50)])
def test_every_variant_learns(kw, real_binary):
    torch.manual_seed(0)
    model = VAE(latent_dim=8, hidden_dim=64, **kw)
    start = model.elbo(real_binary[500:]).mean().item()
    _train(model, real_binary[:500], steps=200)
    assert model.elbo(real_binary[500:]).mean().item() > start + 100


def test_kl_warm_up_weights_the_kl_term_from_zero():
    for k in (1, 2):
        model = VAE(latent_dim=3, hidden_dim=16, iwae_k=k, kl_warmup_steps=4)
        opts = model.configure_optimizers(type("C", (), {"lr": 1e-3}))
        x = torch.bernoulli(torch.full((8, 1, 28, 28), 0.3))
        weights = [model.training_step(x, opts)["kl_weight"].item() for _ in range(6)]
        assert weights == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
        # The step count lives in the optimiser's state, so a resumed run continues it.
        assert opts["adam"].state_dict()["param_groups"][0]["num_steps"] == 6
    # With beta = 0 the IWAE objective ignores the prior: only log p(x|z) is weighted.
    model = VAE(latent_dim=3, hidden_dim=16)
    torch.manual_seed(0)
    rec, _ = model._iwae_terms(x, 3)
    torch.manual_seed(0)
    torch.testing.assert_close(model.iwae_bound(x, 3, beta=0.0),
                               torch.logsumexp(rec, 0) - torch.log(torch.tensor(3.0)))


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("warmup", [0, 4])
def test_training_step_is_one_step_on_the_bound(k, warmup):
    """With SGD at lr 1 the step moves the weights by minus the gradient of the bound
    (the ELBO with its closed-form KL at k = 1, IWAE_k otherwise) computed by hand at the
    same noise, and reports the bound and KL of those draws (mutation testing found the
    KL's weight without warm-up, the k = 1 branch and the reported IWAE unchecked). In a
    warm-up over 4 steps, step 1's objective weights the KL (or log p(z) / q(z|x)) by 1/4
    (planted bugs: the weight left out of either objective)."""
    import copy
    import math

    model = VAE(latent_dim=3, hidden_dim=16, iwae_k=k, kl_warmup_steps=warmup)
    twin = copy.deepcopy(model)
    x = torch.bernoulli(torch.full((8, 1, 28, 28), 0.3))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    opt.param_groups[0]["num_steps"] = 1  # the second step
    beta = 1 / 4 if warmup else 1.0
    torch.manual_seed(1)
    out = model.training_step(x, {"adam": opt})
    torch.manual_seed(1)
    if k == 1:
        rec, kl = twin(x)
        objective = rec - beta * kl
        reported = {"train_elbo": (rec - kl).mean(), "train_kl": kl.mean()}
    else:
        rec, log_ratio = twin._iwae_terms(x, k)
        objective = torch.logsumexp(rec + beta * log_ratio, 0) - math.log(k)
        bound = torch.logsumexp(rec + log_ratio, 0) - math.log(k)
        reported = {"train_iwae": bound.mean(), "train_kl": -log_ratio.mean()}
    if warmup:
        reported["kl_weight"] = torch.tensor(beta)
    (-objective.mean()).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q - q.grad, msg=name)
    assert set(out) == set(reported)
    for key, v in reported.items():
        torch.testing.assert_close(out[key], v.detach(), msg=key)


def test_the_reports_vae_by_default():
    """z = 20, one hidden layer of 500, 500 pseudo-inputs of small logits, no warm-up, the
    ELBO as the best checkpoint's measure unless trained on IWAE_k with k >= 2, a 20 x 20
    manifold."""
    from dgm.config import VAEConfig

    model = VAE()
    assert [m.out_features for m in model.encoder.modules()
            if isinstance(m, torch.nn.Linear)] == [500, 40]
    assert model.iwae_k == 1 and model.kl_warmup_steps == 0
    assert "kl_weight" not in VAE(latent_dim=3, hidden_dim=8).training_step(
        torch.zeros(2, 1, 28, 28), VAE(latent_dim=3, hidden_dim=8).configure_optimizers(
            type("C", (), {"lr": 1e-3})))
    vamp = VAE(prior="vamp")
    assert vamp.pseudo_logits.shape == (500, 784)
    assert 0.09 < vamp.pseudo_logits.std().item() < 0.11
    assert VAE(iwae_k=1).best_metric == ("val_elbo", "max")
    assert VAE(iwae_k=2).best_metric == ("val_iwae", "max")
    assert VAE.from_config(VAEConfig()).image_shape == (1, 28, 28)
    assert VAE(latent_dim=2, hidden_dim=8).manifold().shape == (400, 1, 28, 28)
    for layers in (1, 2):  # a ReLU after every hidden layer, none after the last
        relus = [type(m) for m in VAE(hidden_layers=layers).encoder]
        assert relus.count(torch.nn.ReLU) == layers and relus[-1] is torch.nn.Linear


def test_vamp_prior_draws_prepare_and_iwae_validation():
    """VampPrior draws are a component's mean plus its std times eps; prepare binarises;
    validation reports IWAE_k for a model trained on it."""
    model = _vamp()
    mu, logvar = model.prior_params()
    eps = torch.randn(6, mu.shape[1])
    z = model._prior_draws(eps, (mu, logvar), torch.Generator().manual_seed(3))
    k = torch.randint(len(mu), (6,), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, mu[k] + torch.exp(0.5 * logvar[k]) * eps)
    # sample_prior and the naive estimate draw from that mixture, not from N(0, I)
    # (planted bugs: either one using eps itself).
    gen, again = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    want = model._prior_draws(torch.randn(4, mu.shape[1], generator=again), (mu, logvar),
                              again)
    torch.testing.assert_close(model.sample_prior(4, gen), want)
    xb = torch.bernoulli(torch.full((2, 1, 28, 28), 0.3))
    torch.manual_seed(4)
    naive = model.log_likelihood(xb, 3, "prior")[0]
    torch.manual_seed(4)
    with torch.no_grad():
        z = model._prior_draws(torch.randn(3, 2, mu.shape[1]), (mu, logvar))
        log_px_z = Bernoulli(logits=model.decode(z.flatten(0, 1)).view(3, 2, -1)).log_prob(
            xb.flatten(1)).sum(-1)
    torch.testing.assert_close(naive, torch.logsumexp(log_px_z, 0) - torch.log(torch.tensor(3.)))
    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    assert torch.equal(VAE.prepare(x, torch.Generator().manual_seed(0)),
                       binarize(x, torch.Generator().manual_seed(0)))
    out = VAE(latent_dim=3, hidden_dim=8, iwae_k=3).validation_step(
        torch.bernoulli(torch.full((4, 1, 28, 28), 0.3)))
    assert set(out) == {"val_elbo", "val_kl", "val_iwae"}
    # The validation numbers are the model's own ELBO, KL and IWAE bound (k = 2 counts).
    model, xb = VAE(latent_dim=3, hidden_dim=8, iwae_k=2), torch.bernoulli(
        torch.full((4, 1, 28, 28), 0.3))
    torch.manual_seed(5)
    out = model.validation_step(xb)
    torch.manual_seed(5)
    rec, kl = model(xb)
    torch.testing.assert_close(out["val_elbo"], (rec - kl).mean())
    torch.testing.assert_close(out["val_kl"], kl.mean())
    torch.testing.assert_close(out["val_iwae"], model.iwae_bound(xb, 2).mean())
    assert "val_iwae" not in VAE(latent_dim=3, hidden_dim=8).validation_step(
        torch.bernoulli(torch.full((4, 1, 28, 28), 0.3)))


def test_log_likelihood_decodes_k_samples_in_chunks():
    """Rows decoded per chunk: 4096 on the CPU by default, at least one image's k draws per
    chunk however small ``chunk_rows``, and k draws in all."""
    model = VAE(latent_dim=3, hidden_dim=8)
    rows = []
    model.decoder.register_forward_hook(lambda m, i, o: rows.append(len(i[0])))
    x = torch.bernoulli(torch.full((2, 1, 28, 28), 0.3))
    model.log_likelihood(x[:1], 5000)
    assert rows == [4096, 904]
    rows.clear()
    model.log_likelihood(x, 3, chunk_rows=1)
    assert rows == [2, 2, 2]
    rows.clear()
    model.log_likelihood(x, 10, chunk_rows=6)
    assert rows == [6, 6, 6, 2]


def test_evaluate_vae_replayed_from_its_seed():
    """dgm evaluate's VAE numbers: EVAL_SEED's binarisation, then per image the ELBO, the
    IWAE_k estimate (posterior proposal) and the naive one (prior proposal), each averaged
    over images with its Monte-Carlo error and ESS (planted bug: the naive estimate drawn
    from the posterior, which the end-to-end tests took for a number like any other)."""
    from dgm.evaluate import EVAL_SEED, evaluate_vae

    torch.manual_seed(0)
    model = VAE(latent_dim=3, hidden_dim=16)
    x_uint8 = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8)
    res = evaluate_vae(model, x_uint8, k=6, quiet=True)
    x = model.prepare(x_uint8, torch.Generator().manual_seed(EVAL_SEED))
    torch.manual_seed(EVAL_SEED)
    with torch.no_grad():
        elbo = model.elbo(x)
        est = {key: model.log_likelihood(x, 6, proposal)
               for key, proposal in (("iwae", "posterior"), ("naive", "prior"))}
    assert res["elbo"]["log_px_nats"] == pytest.approx(elbo.double().mean().item(), rel=1e-6)
    for key, (value, se, ess) in est.items():
        assert res[key]["log_px_nats"] == pytest.approx(value.double().mean().item(), rel=1e-6)
        assert res[key]["mc_stderr_nats"] == pytest.approx(se.mean().item(), rel=1e-6)
        assert res[key]["ess"] == pytest.approx(ess.mean().item(), rel=1e-6)
    assert res["naive"]["log_px_nats"] < res["iwae"]["log_px_nats"]


def test_samples_are_the_decoders_bernoulli_means_at_prior_draws():
    """sample(n) = sigmoid(decoder logits) at z ~ p(z), as images in [0, 1] (planted bug: the
    logits themselves)."""
    torch.manual_seed(0)
    model = VAE(latent_dim=3, hidden_dim=16)
    x = model.sample(5, torch.Generator().manual_seed(2))
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = Bernoulli(logits=model.decode(z)).mean.view(5, 1, 28, 28)
    torch.testing.assert_close(x, want)

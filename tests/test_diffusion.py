"""Diffusion: the bound against an exact density, its discrete-time version, the decoder,
the prior term, the samplers, the U-Net, learning, resume and the command line."""

import math

import pytest
import torch

from dgm.cli import main
from dgm.config import DiffusionConfig
from dgm.errors import DgmError
from dgm.models.diffusion import (
    Diffusion,
    NoiseSchedule,
    alpha_sigma,
    decoder_log_prob,
    decoder_logits,
    prior_kl,
    stratified_times,
    to_unit_range,
    to_values,
)
from dgm.models.unet import Attention, ResBlock, UNet, _groups, sinusoidal_embedding

# 2-D Gaussian data N(M, S), as a (2, 1, 1) "image" so the model's own code path is used.
M = torch.tensor([0.4, -0.3], dtype=torch.float64)
S = torch.tensor([[0.20, 0.08], [0.08, 0.10]], dtype=torch.float64)


def gaussian_model(schedule: str = "linear", perturb: float = 0.0) -> Diffusion:
    """A Diffusion whose denoiser is the exact E[x | z_t] of N(M, S) (plus ``perturb``) and
    whose decoder at t = 0 is the Gaussian N(z_0 / alpha_0, sigma_0^2 / alpha_0^2), with
    ends where they cost nothing: gamma_max 12 (alpha_1^2 = 6e-6), gamma_min -13.3."""
    model = Diffusion((2, 1, 1), channels=4, channel_mults=(1,), schedule=schedule,
                      gamma_min=-13.3, gamma_max=12.0).double()

    def exact_eps(z, t):
        alpha, sigma = alpha_sigma(model.schedule.gamma(t))
        a, s2 = alpha[:, None, None], sigma[:, None, None] ** 2
        cov_z = a ** 2 * S + s2 * torch.eye(2, dtype=S.dtype)  # (B, 2, 2)
        zf = z.flatten(1)
        gain = a * S @ torch.linalg.inv(cov_z)  # Cov(x, z) Cov(z)^-1
        x_hat = M + (gain @ (zf - alpha[:, None] * M)[..., None])[..., 0] + perturb
        return ((zf - alpha[:, None] * x_hat) / sigma[:, None]).view_as(z)

    def gaussian_nll(x, z_0):
        alpha_0, sigma_0 = alpha_sigma(torch.tensor(model.schedule.gamma_min,
                                                    dtype=x.dtype))
        var = (sigma_0 / alpha_0) ** 2
        d = (x - z_0 / alpha_0).flatten(1)
        return 0.5 * (d.square() / var + torch.log(2 * math.pi * var)).sum(1)

    model.predict_eps = exact_eps
    model.reconstruction_nll = gaussian_nll
    return model


def exact_nll(x: torch.Tensor) -> torch.Tensor:
    dist = torch.distributions.MultivariateNormal(M, S)
    return -dist.log_prob(x.flatten(1))


def gaussian_data(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(S)
    return (M + torch.randn(n, 2, generator=gen, dtype=torch.float64) @ chol.T).view(n, 2, 1, 1)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_continuous_bound_equals_exact_nll_with_the_exact_denoiser(schedule):
    x = gaussian_data(20000)
    nll = exact_nll(x)
    model = gaussian_model(schedule)
    draws = torch.stack([model.bound_terms(x)["total"] for _ in range(8)], 1)  # (N, 8)
    gap = draws.mean(1) - nll
    se = gap.std() / math.sqrt(len(gap))  # the Monte-Carlo error (the x's cancel)
    assert 0.01 < se < 0.3, se  # the test has power: the error is small but honest
    assert abs(gap.mean()) < 3 * se + 0.01, (gap.mean(), se)  # equal within its error
    # A slightly wrong denoiser pays, far beyond that error: strictly above.
    wrong = gaussian_model(schedule, perturb=5e-3)
    gap_wrong = torch.stack([wrong.bound_terms(x)["total"] for _ in range(8)], 1).mean(1) - nll
    assert gap_wrong.mean() > gap.mean() + 10 * se, (gap_wrong.mean(), gap.mean(), se)


def test_the_bound_draws_noise_levels_uniform_in_log_snr():
    """On the cosine schedule the bound's default draws are uniform in log SNR with weight
    gamma_max - gamma_min: the same integral as draws uniform in t weighted by gamma'(t),
    at a quarter of the spread (the exact denoiser of N(M, S), so the gap to the true
    -log p is all Monte-Carlo noise). On the linear schedule the two draws are one.
    Planted bugs: t uniform with the constant weight (biased), gamma'(t) kept (biased)."""
    lin = NoiseSchedule("linear", -13.3, 5.0)
    u = torch.rand(50, dtype=torch.float64)
    t, w = lin.bound_times(u)
    assert t is u and torch.equal(w, torch.full_like(u, 18.3))
    cos = NoiseSchedule("cosine", -13.3, 5.0)
    t, w = cos.bound_times(u)
    torch.testing.assert_close(cos.gamma(t), -13.3 + 18.3 * u)
    torch.testing.assert_close(w, torch.full_like(u, 18.3))

    x = gaussian_data(20000, seed=3)
    model = gaussian_model("cosine")
    torch.manual_seed(7)
    in_log_snr = model.bound_terms(x)["total"] - exact_nll(x)
    in_t = model.bound_terms(x, torch.rand(len(x), dtype=x.dtype))["total"] - exact_nll(x)
    se = math.hypot(in_log_snr.std(), in_t.std()) / math.sqrt(len(x))
    assert abs(in_log_snr.mean() - in_t.mean()) < 4 * se, (in_log_snr.mean(), in_t.mean())
    assert abs(in_log_snr.mean()) < 4 * in_log_snr.std() / math.sqrt(len(x))
    assert in_t.std() > 3 * in_log_snr.std(), (in_t.std(), in_log_snr.std())


def test_evaluate_draws_the_bound_uniform_in_log_snr():
    """`dgm evaluate`'s bound of a cosine-schedule model is as tight in its errors as the
    linear schedule's (planted bug: its draws uniform in t, 4x the standard error)."""
    from dgm.evaluate import evaluate_diffusion

    x = to_values(gaussian_data(4000, seed=5).clamp(-1, 1)).to(torch.uint8)
    sem = {kind: evaluate_diffusion(gaussian_model(kind), x, time_samples=2, batch_size=1000,
                                    quiet=True)["nll_bound"]["sem_nats"]
           for kind in ("linear", "cosine")}
    assert sem["cosine"] < 1.5 * sem["linear"], sem


def test_discrete_bound_falls_towards_the_continuous_one():
    x = gaussian_data(4000, seed=1)
    model = gaussian_model()
    gen = torch.Generator().manual_seed(2)
    eps = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    eps_0 = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    ones = torch.ones(len(x), dtype=x.dtype)

    def expected(steps: int | None, points: int) -> torch.Tensor:
        # Per image, the exact mean over the T steps (or a fine midpoint rule in continuous
        # time), with common noise so that differences between T are not Monte-Carlo noise.
        ts = [(i + 1) / points for i in range(points)] if steps else \
            [(i + 0.5) / points for i in range(points)]
        return sum(model.bound_terms(x, t * ones, eps, eps_0, steps)["total"]
                   for t in ts) / points

    bounds = [expected(T, T).mean().item() for T in (1, 2, 4, 8, 16, 32)]
    per_image = expected(None, 512)
    continuous = per_image.mean().item()
    assert all(a > b for a, b in zip(bounds, bounds[1:], strict=False)), bounds
    assert bounds[-1] > continuous, (bounds[-1], continuous)
    # and closes most of the gap to it (VDM: the excess shrinks roughly like 1 / T)
    assert bounds[-1] - continuous < 0.1 * (bounds[0] - continuous), (bounds, continuous)
    gap = per_image - exact_nll(x)  # one draw of eps per image: equal within its error
    assert abs(gap.mean()) < 3 * gap.std() / math.sqrt(len(gap)), gap.mean()


def test_decoder_probabilities_sum_to_one_and_peak_at_the_pixel():
    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 256, (3, 1, 4, 4), generator=gen)
    x = to_unit_range(values)
    assert torch.equal(to_values(x), values)
    for gamma_0 in (-13.3, -5.0, 0.0):
        alpha_0, sigma_0 = alpha_sigma(torch.tensor(gamma_0))
        z_0 = alpha_0 * x + sigma_0 * torch.randn(x.shape, generator=gen)
        logits = decoder_logits(z_0.double(), gamma_0)
        assert logits.shape == (3, 1, 4, 4, 256)
        p = torch.softmax(logits, -1)
        torch.testing.assert_close(p.sum(-1), torch.ones(3, 1, 4, 4, dtype=torch.float64))
        manual = torch.log(p.gather(-1, values[..., None])).flatten(1).sum(1)
        torch.testing.assert_close(decoder_log_prob(z_0.double(), values, gamma_0), manual)
    # At gamma_min -13.3 the decoder's width is 1/3 of a bin: the noiseless z_0 gets ~99.7%.
    alpha_0, _ = alpha_sigma(torch.tensor(-13.3))
    p = torch.softmax(decoder_logits(alpha_0 * x, -13.3), -1).gather(-1, values[..., None])
    assert (p > 0.99).all()


def test_prior_term_matches_torch_distributions():
    x = to_unit_range(torch.randint(0, 256, (5, 1, 3, 3))).double()
    for gamma_1 in (5.0, 0.0, -2.0):
        alpha, sigma = alpha_sigma(torch.tensor(gamma_1, dtype=torch.float64))
        q = torch.distributions.Normal(alpha * x, sigma)
        p = torch.distributions.Normal(torch.zeros_like(x), torch.ones_like(x))
        ref = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
        torch.testing.assert_close(prior_kl(x, torch.tensor(gamma_1, dtype=torch.float64)), ref)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_ends_and_derivative(kind):
    sched = NoiseSchedule(kind, -13.3, 5.0)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(sched.gamma(t), torch.tensor([-13.3, 5.0], dtype=torch.float64))
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(sched.gamma(t).sum(), t)
    torch.testing.assert_close(sched.gamma_prime(t.detach()), grad)
    assert (grad > 0).all()  # monotone: the noise rises with t
    with pytest.raises(ValueError):
        NoiseSchedule(kind, 5.0, 5.0)


def test_v_parameterization_recovers_eps():
    model = Diffusion((1, 4, 4), channels=4, channel_mults=(1,), parameterization="v").double()
    x, eps = torch.rand(3, 1, 4, 4).double() * 2 - 1, torch.randn(3, 1, 4, 4).double()
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    alpha, sigma = (v.view(-1, 1, 1, 1) for v in alpha_sigma(model.schedule.gamma(t)))
    z = alpha * x + sigma * eps
    model.net.forward = lambda z_, t_: alpha * eps - sigma * x  # it predicts v exactly
    torch.testing.assert_close(model.predict_eps(z, t), eps)


def tiny_model(**kw) -> Diffusion:
    torch.manual_seed(0)
    model = Diffusion((1, 8, 8), channels=8, channel_mults=(1, 2), num_res_blocks=1, **kw)
    with torch.no_grad():  # away from the zero output that the U-Net starts with
        for p in model.net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.1)
    return model.eval()


def test_ddim_with_eta_one_draws_what_ancestral_draws_and_eta_zero_is_deterministic():
    model = tiny_model()
    n, steps = 2000, 6
    z = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ddpm = model.reverse(z, steps, "ddpm", generator=torch.Generator().manual_seed(2))
    ddim1 = model.reverse(z, steps, "ddim", eta=1.0, generator=torch.Generator().manual_seed(3))
    ddim0 = model.reverse(z, steps, "ddim", eta=0.0)
    for power in (1, 2):  # first and second moments of every pixel
        a, b = ddpm.pow(power), ddim1.pow(power)
        se = ((a.var(0) + b.var(0)) / n).sqrt()  # of the difference of the two means
        z_scores = (a.mean(0) - b.mean(0)) / se.clamp_min(1e-6)
        assert z_scores.abs().max() < 4.5, z_scores.abs().max()
    # The same moments differ from the deterministic sampler's, so the test can fail (by
    # about 10 standard errors of a pixel's std here; 5 leaves room for other CPUs' rounding).
    assert (ddpm.std(0) - ddim0.std(0)).abs().mean() > 5 * (ddpm.std(0) / math.sqrt(n)).mean()
    again = model.reverse(z[:8], steps, "ddim")
    torch.testing.assert_close(model.reverse(z[:8], steps, "ddim"), again, rtol=0, atol=0)
    torch.testing.assert_close(again, ddim0[:8], rtol=0, atol=1e-5)  # batch size aside
    assert not torch.equal(model.reverse(z[:8], steps, "ddpm"), ddpm[:8])


def test_sample_and_generate_shapes_and_range():
    model = tiny_model(sample_steps=3)
    x = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 1, 8, 8) and x.min() >= 0 and x.max() <= 1
    torch.testing.assert_close(model.sample(5, generator=torch.Generator().manual_seed(0)), x)
    # generate is DDIM at eta 0 from the given noise: deterministic, the sampler's steps, in
    # [0, 1]; a DDIM sample from the same noise is the same image.
    z = torch.randn(2, *model.latent_shape)
    images = model.generate(z)
    assert images.shape == (2, 1, 8, 8) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(model.generate(z), images)
    ddim = tiny_model(sample_steps=3, sampler="ddim")
    ddim.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(4)
    noise = torch.randn(2, *model.image_shape, generator=gen)
    torch.testing.assert_close(ddim.sample(2, generator=torch.Generator().manual_seed(4)),
                               model.generate(noise))


def test_unet_shapes_and_divisibility(tmp_path):
    for shape, mults in (((3, 32, 32), (1, 2, 2)), ((1, 28, 28), (1, 2, 2)), ((2, 6, 10), (1, 2))):
        net = UNet(shape[0], 8, mults, 2)
        assert net(torch.randn(2, *shape), torch.rand(2)).shape == (2, *shape)
    cfg = DiffusionConfig(channel_mults=[1, 2, 2, 2])  # 28 / 8 is not whole
    with pytest.raises(DgmError, match="divisible by 8"):
        Diffusion.from_config(cfg, (1, 28, 28))


def test_every_parameter_gets_a_gradient_and_a_tiny_model_learns(real_data_dir):
    from dgm.data import load_split

    x = Diffusion.prepare(load_split("mnist", "test[:256]", real_data_dir)[0])
    torch.manual_seed(0)
    model = Diffusion((1, 28, 28), channels=8, channel_mults=(1, 2), num_res_blocks=1)
    opts = model.configure_optimizers(DiffusionConfig(lr=2e-3, grad_clip=1.0))
    gen = torch.Generator().manual_seed(5)
    probe = x[:128]
    t = torch.rand(len(probe), generator=gen)
    eps, eps_0 = torch.randn(probe.shape, generator=gen), torch.randn(probe.shape, generator=gen)

    def bound() -> float:
        with torch.no_grad():
            return model.bound_terms(probe, t, eps, eps_0)["total"].mean().item()

    before = bound()
    model.train()
    # The U-Net's last convs start at zero, which blocks every gradient behind them for one
    # step (and the residual branches' for two); then every parameter must get one.
    model.training_step(x[:32], opts)
    model.training_step(x[32:64], opts)
    opts["adam"].zero_grad()
    model.bound_terms(x[:32])["total"].mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing
    for _ in range(4):
        for idx in torch.randperm(len(x)).split(32):
            model.training_step(x[idx], opts)
    after = bound()
    assert after < 0.6 * before, (before, after)


def test_resumed_run_equals_uninterrupted_run(fake_data_dir, tmp_path):
    common = ["--dataset", "mnist", "--data-dir", str(fake_data_dir), "--offline",
              "--train-split", "train[:64]", "--val-split", "test[:32]", "--batch-size", "32",
              "--channels", "8", "--channel-mults", "1,2", "--sample-steps", "2",
              "--sample-epochs", "0", "--quiet"]
    for run, epochs in (("a", "2"), ("b", "1")):
        assert main(["train", "diffusion", *common, "--epochs", epochs, "--out",
                     str(tmp_path / run)]) == 0
    assert main(["train", "diffusion", *common, "--epochs", "2", "--resume",
                 str(tmp_path / "b")]) == 0
    rows = [(tmp_path / r / "metrics.csv").read_text().splitlines()[2].split(",")[:-1]
            for r in ("a", "b")]
    assert rows[0] == rows[1]


@pytest.mark.parametrize("flags,match", [
    (["--channel-mults", "1,2,2,2"], "divisible by 8"),
    (["--channel-mults", "1,0"], "positive integers"),
    (["--gamma-min", "6"], "must be below --gamma-max"),
])
def test_bad_options_are_one_line_errors(flags, match, fake_data_dir, tmp_path, capsys):
    code = main(["train", "diffusion", "--dataset", "mnist", "--data-dir", str(fake_data_dir),
                 "--offline", "--quiet", "--out", str(tmp_path / "r"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and match in err, err


def test_to_values_inverts_to_unit_range_within_each_bin():
    k = torch.arange(256)
    x = to_unit_range(k.to(torch.uint8))
    assert torch.equal(to_values(x), k)
    half_bin = 1 / 256  # bins are 2 / 256 wide on [-1, 1]
    assert torch.equal(to_values(x + 0.99 * half_bin), k)
    assert torch.equal(to_values(x - 0.99 * half_bin), k)
    assert torch.equal(to_values(torch.tensor([-1.5, 1.5])), torch.tensor([0, 255]))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_time_of_inverts_the_schedule(kind):
    s = NoiseSchedule(kind)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    back = torch.tensor([s.time_of(g) for g in s.gamma(t).tolist()], dtype=torch.float64)
    assert torch.allclose(back, t, atol=1e-9)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_time_grids_fall_from_one_to_zero_as_documented(kind):
    model = Diffusion((1, 8, 8), channels=8, channel_mults=(1, 2), schedule=kind,
                      sample_rho=0.0)
    assert model.time_grid(4) == [1.0, 0.75, 0.5, 0.25, 0.0]  # rho 0: equal steps of t
    for rho in (1.0, 3.0, 7.0):
        model.sample_rho = rho
        grid = model.time_grid(10)
        assert len(grid) == 11 and grid[0] == 1.0 and grid[-1] == 0.0
        assert all(a > b for a, b in zip(grid[:-1], grid[1:], strict=True))
        # Karras et al.'s eq. 5: (sigma / alpha)^(1 / rho) = exp(gamma / (2 rho)) in equal steps.
        root = (model.schedule.gamma(torch.tensor(grid, dtype=torch.float64)) / (2 * rho)).exp()
        assert torch.allclose(root.diff(), root.diff()[:1].expand(10), rtol=1e-6)
    # The smaller rho, the later (in t from 1) the steps leave the high noise levels.
    model.sample_rho = 3.0
    mid_3 = model.time_grid(10)[5]
    model.sample_rho = 7.0
    assert mid_3 > model.time_grid(10)[5]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_the_samplers_step_through_the_time_grid(sampler, monkeypatch):
    model = tiny_model(sample_steps=5, sample_rho=3.0, sampler=sampler)
    seen = []
    step = "ddim_step" if sampler == "ddim" else "ancestral_step"
    original = getattr(model, step)
    monkeypatch.setattr(model, step,
                        lambda z, t, s, *a: seen.append((t, s)) or original(z, t, s, *a))
    model.sample(2, generator=torch.Generator().manual_seed(0))
    grid = model.time_grid(5)
    assert seen == list(zip(grid[:-1], grid[1:], strict=True))
    assert grid != [i / 5 for i in range(5, -1, -1)]


def test_sample_eta_reaches_every_ddim_step_and_adds_noise():
    model = tiny_model(sample_steps=3, sampler="ddim")
    assert model.sample_eta == 0.0  # deterministic DDIM unless asked
    etas = []
    original = model.ddim_step
    model.ddim_step = lambda z, t, s, eta, g: etas.append(eta) or original(z, t, s, eta, g)
    draws = [model.sample(2, generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    model.sample_eta = 0.5
    noisy = model.sample(2, generator=torch.Generator().manual_seed(0))
    assert etas == [0.0] * 6 + [0.5] * 3
    # eta 0: the same z_1 gives the same image; eta 0.5 draws noise on the way down.
    torch.testing.assert_close(draws[0], draws[1])
    assert not torch.allclose(noisy, draws[0])
    with pytest.raises(DgmError, match="--sample-eta is DDIM's"):
        Diffusion.from_config(DiffusionConfig(sample_eta=0.5))  # the default sampler is ddpm
    assert Diffusion.from_config(DiffusionConfig(sample_eta=0.5, sampler="ddim")).sample_eta == 0.5


def test_the_documented_defaults():
    """VDM's fixed schedule (-13.3 to 5), the README's U-Net (32 channels, multipliers
    1, 2, 2, one block a level: 1,062,497 parameters), ancestral sampling in 25 steps
    spaced at rho 3, 28x28 grey images; one default set whether built directly or from
    DiffusionConfig."""
    direct, from_cfg = Diffusion(), Diffusion.from_config(DiffusionConfig())
    for m in (direct, from_cfg):
        assert m.image_shape == (1, 28, 28)
        assert (m.schedule.kind, m.schedule.gamma_min, m.schedule.gamma_max) == \
            ("linear", -13.3, 5.0)
        assert (m.sampler, m.sample_steps, m.sample_rho, m.loss, m.parameterization) == \
            ("ddpm", 25, 3.0, "elbo", "eps")
        assert sum(p.numel() for p in m.parameters()) == 1_062_497
    assert [p.shape for p in direct.parameters()] == [p.shape for p in from_cfg.parameters()]
    s = NoiseSchedule()
    assert (s.kind, s.gamma_min, s.gamma_max) == ("linear", -13.3, 5.0)
    assert Diffusion(loss="elbo").best_metric == ("val_bpd", "min")
    assert Diffusion(loss="simple").best_metric == ("val_mse", "min")


@pytest.mark.parametrize("changes, shape, match", [
    (dict(channel_mults=[]), (1, 28, 28), "one or more integers"),
    (dict(channel_mults=[0, 1]), (1, 28, 28), "one or more integers"),
    (dict(), (1, 28, 30), "divisible by 4, and these images are 28x30"),
    (dict(), (1, 30, 28), "divisible by 4, and these images are 30x28"),
    (dict(gamma_min=5.0), (1, 28, 28), "must be below --gamma-max"),
])
def test_from_config_refuses_what_the_python_api_can_pass(changes, shape, match):
    """DiffusionConfig(...) in Python is not validated as the CLI's options are."""
    with pytest.raises(DgmError, match=match):
        Diffusion.from_config(DiffusionConfig(**changes), shape)


def test_decoder_is_a_gaussian_around_z0_over_the_256_bin_centres():
    """log p(k | z_0) = log N(z_0; alpha_0 x_k, sigma_0^2) normalised over k."""
    gen = torch.Generator().manual_seed(0)
    z_0 = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    gamma_0 = torch.tensor(-4.0, dtype=torch.float64)  # wide enough to spread over bins
    alpha_0, sigma_0 = alpha_sigma(gamma_0)
    centres = to_unit_range(torch.arange(256)).double()
    want = torch.distributions.Normal(alpha_0 * centres, sigma_0).log_prob(z_0[..., None])
    torch.testing.assert_close(torch.log_softmax(decoder_logits(z_0, gamma_0), -1),
                               torch.log_softmax(want, -1))


def _snr(gamma: torch.Tensor) -> torch.Tensor:
    return torch.exp(-gamma)


def test_bound_terms_by_hand():
    """The T-step diffusion term T/2 (SNR(s) - SNR(t)) ||x - x_hat||^2 (VDM eq. 13, in
    x-space), the eps error, the prior KL and the reconstruction -log p >= 0 at their ends of
    the schedule, their sum, bits/dim = total / (D ln 2)."""
    model = tiny_model().double()
    gen = torch.Generator().manual_seed(4)
    x = to_unit_range(torch.randint(0, 256, (6, 1, 8, 8), generator=gen)).double()
    eps, eps_0 = (torch.randn(x.shape, generator=gen, dtype=x.dtype) for _ in range(2))
    steps = 5
    t = torch.tensor([1, 2, 3, 4, 5, 5], dtype=x.dtype) / steps
    terms = model.bound_terms(x, t, eps, eps_0, steps)
    g_t, g_s = model.schedule.gamma(t), model.schedule.gamma(t - 1 / steps)
    alpha, sigma = alpha_sigma(g_t)
    z_t = alpha.view(-1, 1, 1, 1) * x + sigma.view(-1, 1, 1, 1) * eps
    eps_hat = model.predict_eps(z_t, t)
    x_hat = (z_t - sigma.view(-1, 1, 1, 1) * eps_hat) / alpha.view(-1, 1, 1, 1)
    want = steps / 2 * (_snr(g_s) - _snr(g_t)) * (x - x_hat).square().flatten(1).sum(1)
    torch.testing.assert_close(terms["diffusion"], want)
    torch.testing.assert_close(terms["mse"], (eps - eps_hat).square().mean((1, 2, 3)))
    assert (terms["reconstruction"] >= 0).all()
    # The two ends, from their own tested formulas (planted bugs: the prior term dropped;
    # the decoder at another width than the schedule's gamma_min).
    ones = torch.ones(6, dtype=x.dtype)
    prior = prior_kl(x, model.schedule.gamma(ones))
    assert (prior > 1e-3).all()  # gamma_max's default leaves a prior worth checking
    torch.testing.assert_close(terms["prior"], prior)
    alpha_0, sigma_0 = alpha_sigma(model.schedule.gamma(0 * ones))
    z_0 = alpha_0.view(-1, 1, 1, 1) * x + sigma_0.view(-1, 1, 1, 1) * eps_0
    torch.testing.assert_close(terms["reconstruction"],
                               -decoder_log_prob(z_0, to_values(x), model.schedule.gamma_min))
    torch.testing.assert_close(terms["total"], terms["prior"] + terms["diffusion"]
                               + terms["reconstruction"])
    torch.manual_seed(5)
    bpd = model.bits_per_dim(x)
    torch.manual_seed(5)
    torch.testing.assert_close(bpd, model.bound_terms(x)["total"] / (64 * math.log(2)))


@pytest.mark.parametrize("loss,schedule", [("simple", "cosine"), ("elbo", "cosine"),
                                           ("simple", "linear")])
def test_validation_draws_t_as_training_does(loss, schedule):
    """val_bpd is the bound at times uniform in log SNR; val_mse is the eps error at the
    times that training draws: uniform in t for the simple loss (which, on the cosine
    schedule, are not the bound's), the bound's own for elbo. Replayed from the same seed.
    Planted bug: the simple loss's val_mse taken at the bound's times."""
    model = tiny_model(loss=loss, schedule=schedule).double()
    x = to_unit_range(torch.randint(0, 256, (6, 1, 8, 8),
                                    generator=torch.Generator().manual_seed(2))).double()
    torch.manual_seed(7)
    out = model.validation_step(x)
    torch.manual_seed(7)
    terms = model.bound_terms(x)  # t from NoiseSchedule.bound_times
    torch.testing.assert_close(out["val_bpd"], (terms["total"] / (64 * math.log(2))).mean())
    mse = terms["mse"].mean()
    if loss == "simple" and schedule != "linear":
        t = stratified_times(6, "cpu", x.dtype)
        mse = model.bound_terms(x, t)["mse"].mean()
        assert not torch.allclose(mse, terms["mse"].mean())
    torch.testing.assert_close(out["val_mse"], mse)


def test_stratified_times_are_one_uniform_shifted_by_i_over_n():
    """VDM's low-discrepancy draw: (u + i / n) mod 1 for one u ~ U[0, 1) from the generator,
    so sorted they step by exactly 1 / n. Planted bug: i.i.d. uniform times."""
    t = stratified_times(8, "cpu", torch.float64, torch.Generator().manual_seed(3))
    u = torch.rand((), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(t, (u + torch.arange(8, dtype=torch.float64) / 8) % 1)
    torch.testing.assert_close(t.sort().values.diff(), torch.full((7,), 1 / 8, dtype=t.dtype))
    assert 0 <= t.min() and t.max() < 1


def test_the_t_step_bound_draws_t_on_its_grid():
    """Without given times, the T-step bound rounds the stratified draw up to i / T,
    i = 1..T (t = 0 would need a step from s = -1 / T)."""
    model = tiny_model().double()
    x = to_unit_range(torch.randint(0, 256, (7, 1, 8, 8))).double()
    torch.manual_seed(6)
    got = model.bound_terms(x, steps=4)["total"]
    torch.manual_seed(6)
    t = torch.ceil(stratified_times(7, "cpu", x.dtype) * 4).clamp(1, 4) / 4
    eps, eps_0 = torch.randn_like(x), torch.randn_like(x)
    torch.testing.assert_close(got, model.bound_terms(x, t, eps, eps_0, 4)["total"])


def test_denoiser_is_the_posterior_mean_and_steps_match_their_posteriors():
    """With the exact denoiser of Gaussian data, x_hat is E[x | z_t] clipped to [-1, 1].
    The ancestral step is q(z_s | z_t, x_hat) of VDM eq. 32-34, and DDIM with eta = 1 is
    that same step (same noise, other formula); DDIM's default eta is 0 (deterministic)."""
    model = gaussian_model()
    gen = torch.Generator().manual_seed(7)
    z = 6 * torch.randn(500, 2, 1, 1, generator=gen, dtype=torch.float64)
    t, s = 0.6, 0.45
    tt = torch.full((500,), t, dtype=torch.float64)
    x_hat, eps_hat = model._denoise(z, tt)
    alpha_t, sigma_t = alpha_sigma(model.schedule.gamma(tt))
    mean = (z - sigma_t.view(-1, 1, 1, 1) * model.predict_eps(z, tt)) / alpha_t.view(-1, 1, 1, 1)
    assert (mean > 1).any() and (mean < -1).any() and (mean.abs() < 1).any()  # the clip's
    # both ends bite, and not everywhere
    torch.testing.assert_close(x_hat, mean.clamp(-1, 1))
    torch.testing.assert_close(alpha_t.view(-1, 1, 1, 1) * x_hat
                               + sigma_t.view(-1, 1, 1, 1) * eps_hat, z)
    def alpha_sigma_at(time: float) -> tuple[torch.Tensor, torch.Tensor]:
        gamma = model.schedule.gamma(torch.tensor([time], dtype=torch.float64))
        return tuple(v[0] for v in alpha_sigma(gamma))
    a_t, s_t = alpha_sigma_at(t)
    a_s, s_s = alpha_sigma_at(s)
    a_ts, var_ts = a_t / a_s, s_t ** 2 - (a_t / a_s) ** 2 * s_s ** 2
    post_mean = a_ts * s_s ** 2 / s_t ** 2 * z + a_s * var_ts / s_t ** 2 * x_hat
    post_std = (var_ts * s_s ** 2 / s_t ** 2).sqrt()
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(8), dtype=z.dtype)
    ddpm = model.ancestral_step(z, t, s, torch.Generator().manual_seed(8))
    torch.testing.assert_close(ddpm, post_mean + post_std * noise)
    ddim1 = model.ddim_step(z, t, s, eta=1.0, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(ddim1, ddpm)
    torch.testing.assert_close(model.ddim_step(z, t, s), model.ddim_step(z, t, s, eta=0.0))
    torch.testing.assert_close(model.ddim_step(z, t, s), a_s * x_hat + s_s * eps_hat)


def test_reverse_walks_the_time_grid_and_rescales_z0():
    model = tiny_model(sample_steps=4, gamma_min=-3.0, sample_rho=0.0)  # alpha_0 = 0.977
    seen = []

    def step(z, t, s, eta=0.0, generator=None):
        seen.append((t, s))
        return z + 0.5
    model.ddim_step = step
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    out = model.reverse(z, 4, "ddim")
    assert seen == [(1.0, 0.75), (0.75, 0.5), (0.5, 0.25), (0.25, 0.0)]
    alpha_0, _ = alpha_sigma(torch.tensor(-3.0))
    torch.testing.assert_close(out, (((z + 2) / alpha_0).clamp(-1, 1) + 1) / 2)


def test_sample_and_generate_are_reverse_from_their_noise():
    model = tiny_model(sample_steps=3, sampler="ddim")
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(model.generate(z), model.reverse(z, 3, "ddim"))
    got = model.sample(4, generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(got, model.reverse(z, 3, "ddim", eta=0.0))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("loss", ["elbo", "simple"])
def test_training_step_descends_its_loss(loss, schedule):
    """The gradient an optimiser gets is that of the bound in bits/dim (elbo, noise levels
    uniform in log SNR) or of the eps error (simple, t uniform: the schedule's weighting),
    unclipped unless configured. On the linear schedule gamma' is constant, so the two
    differ only by the factor gamma' / (2 ln 2): the same noise weighting."""
    model = tiny_model(loss=loss, schedule=schedule).train()
    x = to_unit_range(torch.randint(0, 256, (8, 1, 8, 8), generator=torch.Generator()
                                    .manual_seed(11)))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # leaves the gradient in .grad
    torch.manual_seed(12)
    model.training_step(x, {"adam": opt})
    got = [p.grad.clone() for p in model.parameters()]
    torch.manual_seed(12)
    t = stratified_times(len(x), "cpu") if loss == "simple" else None
    terms = model.bound_terms(x, t)
    bpd = (terms["total"] / (64 * math.log(2))).mean()
    mse = terms["mse"].mean()
    want = torch.autograd.grad(bpd if loss == "elbo" else mse, list(model.parameters()))
    assert math.sqrt(sum(g.square().sum() for g in want)) > 1  # a default clip would bite
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    if loss == "elbo" and schedule == "linear":
        torch.manual_seed(12)
        g_mse = torch.autograd.grad(model.bound_terms(x)["mse"].mean(),
                                    list(model.parameters()))
        factor = (5.0 + 13.3) / (2 * math.log(2))
        for g, w in zip(want, g_mse, strict=True):
            torch.testing.assert_close(g, factor * w)


@pytest.mark.parametrize("dim", [4, 6, 7])
def test_sinusoidal_embedding_is_the_transformers_at_1000_t(dim):
    """[sin(1000 t w_i), cos(1000 t w_i)], w_i = 10000^(-i / (half - 1)), i < half = dim // 2,
    zero-padded to an odd dim."""
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    half = dim // 2
    w = torch.tensor([10000.0 ** (-i / (half - 1)) for i in range(half)], dtype=torch.float64)
    args = 1000 * t[:, None] * w
    want = torch.cat([args.sin(), args.cos()] + ([torch.zeros(3, 1)] if dim % 2 else []), 1)
    torch.testing.assert_close(sinusoidal_embedding(t, dim), want.double(), rtol=0, atol=1e-5)


def test_unet_starts_at_zero_with_identity_blocks():
    """The output conv starts at zero (eps_hat = 0) and every residual block and the
    attention start as the identity (or the block's 1x1 skip), with no dropout by default."""
    gen = torch.Generator().manual_seed(13)
    x, temb = torch.randn(2, 8, 4, 4, generator=gen), torch.randn(2, 16, generator=gen)
    block = ResBlock(8, 8, 16)
    assert block.dropout.p == 0.0 and UNet().down[0].dropout.p == 0.0
    torch.testing.assert_close(block(x, temb), x)
    wider = ResBlock(8, 16, 16)
    torch.testing.assert_close(wider(x, temb), wider.skip(x))
    torch.testing.assert_close(Attention(8)(x), x)
    z = torch.randn(2, 1, 28, 28, generator=gen)
    assert torch.equal(UNet()(z, torch.rand(2, generator=gen)), torch.zeros_like(z))


def test_unet_defaults_groups_and_attention_by_hand():
    """UNet()'s defaults are Diffusion()'s; GroupNorm takes 8 groups, or the most of 4, 2, 1
    that divide the width; the attention is single-head softmax(q k^T / sqrt(C)) v over the
    H * W positions, added to its input."""
    assert sum(p.numel() for p in UNet().parameters()) == 1_062_497
    assert [_groups(c) for c in (64, 32, 12, 6, 3)] == [8, 8, 4, 2, 1]
    gen = torch.Generator().manual_seed(14)
    attn = Attention(8).double()
    with torch.no_grad():
        attn.out.weight.normal_(generator=gen)
    x = torch.randn(2, 8, 3, 5, generator=gen, dtype=torch.float64)
    q, k, v = attn.qkv(attn.norm(x)).flatten(2).split(8, dim=1)  # (B, C, HW) each
    weights = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(8), dim=-1)  # (B, HW, HW)
    a = (v @ weights.transpose(1, 2)).view(2, 8, 3, 5)
    torch.testing.assert_close(attn(x), x + attn.out(a))

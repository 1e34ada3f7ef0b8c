import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from dgm.config import FlowConfig
from dgm.maths import (
    bernoulli_log_prob,
    bits_per_dim,
    dequantize,
    dequantize_logdet,
    kl_std_normal,
    log_mean_exp_stats,
    logit_inverse,
    logit_transform,
    std_normal_log_prob,
)


def test_kl_matches_torch_distributions():
    mu = torch.randn(64, 20, dtype=torch.float64) * 3
    logvar = torch.randn(64, 20, dtype=torch.float64) * 2
    q = Normal(mu, torch.exp(0.5 * logvar))
    p = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = kl_divergence(q, p).sum(-1)
    torch.testing.assert_close(kl_std_normal(mu, logvar), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("sigma_minus_1", "mu", "expected"), [
    # (sigma^2 + mu^2 - 1) / 2 - log sigma, with sigma = 1 + e and mu = e:
    (1e5, 1e5, ((1 + 1e5) ** 2 + 1e10 - 1) / 2 - math.log(1 + 1e5)),  # about 1.0e10
    (1e-5, 1e-5, 1.5e-10 - 1e-15 / 3 + 1e-20 / 4),  # series 3/2 e^2 - e^3/3 + e^4/4
])
def test_kl_report_examples_in_float64(sigma_minus_1, mu, expected):
    e = torch.tensor([sigma_minus_1], dtype=torch.float64)
    logvar = 2 * torch.log1p(e)
    kl = kl_std_normal(torch.tensor([mu], dtype=torch.float64), logvar).item()
    assert kl == pytest.approx(expected, rel=1e-9)


def test_report_inverse_variance_formula_is_wrong():
    # The report's eqs. 24-25 put 1/s where s belongs; for s != 1 it disagrees with torch.
    mu, s = torch.zeros(1, 1, dtype=torch.float64), torch.full((1, 1), 4.0, dtype=torch.float64)
    report = 0.5 * (1 / s + mu.square() - 1 - torch.log(s)).sum(-1)
    truth = kl_divergence(Normal(mu, s.sqrt()), Normal(0.0, 1.0)).sum(-1)
    assert not torch.allclose(report, truth)
    torch.testing.assert_close(kl_std_normal(mu, torch.log(s)), truth)


def test_bernoulli_and_normal_log_probs_match_torch():
    logits = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    x = torch.bernoulli(torch.full_like(logits, 0.5))
    expected = Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(bernoulli_log_prob(logits, x), expected)
    z = torch.randn(8, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(std_normal_log_prob(z), Normal(0.0, 1.0).log_prob(z).sum((1, 2)))


def test_log_mean_exp_stats_extremes():
    k = 1000
    equal = torch.full((k, 3), -5.0, dtype=torch.float64)
    est, se, ess = log_mean_exp_stats(equal)
    torch.testing.assert_close(est, torch.full((3,), -5.0, dtype=torch.float64))
    torch.testing.assert_close(ess, torch.full((3,), float(k), dtype=torch.float64))
    assert se.abs().max() < 1e-9
    one_dominates = torch.full((k, 1), -1000.0, dtype=torch.float64)
    one_dominates[7] = 0.0
    est, se, ess = log_mean_exp_stats(one_dominates)
    assert est.item() == pytest.approx(-math.log(k))
    assert ess.item() == pytest.approx(1.0)
    assert se.item() > 50  # one group holds the weight, nine are ~1000 nats lower
    assert log_mean_exp_stats(equal[:1])[1].isnan().all()


def test_log_mean_exp_stats_stderr_is_spread_of_group_estimates():
    log_w = torch.randn(1000, 2, dtype=torch.float64)
    est, se, _ = log_mean_exp_stats(log_w)  # the default: 10 groups
    assert est[0].item() == pytest.approx(math.log(log_w[:, 0].exp().mean().item()))
    groups = [math.log(g.exp().mean()) for g in log_w[:, 0].split(100)]
    assert se[0].item() == pytest.approx(torch.tensor(groups).std().item() / math.sqrt(10))
    # Two groups are the fewest that give a spread.
    two = [math.log(g.exp().mean()) for g in log_w[:, 0].split(500)]
    se2 = log_mean_exp_stats(log_w, groups=2)[1][0].item()
    assert se2 == pytest.approx(abs(two[0] - two[1]) / 2)  # std of 2 = |a - b| / sqrt 2
    assert log_mean_exp_stats(log_w, groups=1)[1].isnan().all()


def test_bits_per_dim():
    assert bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)


def test_dequantize_adds_uniform_noise_and_scales():
    x = torch.randint(0, 256, (4, 1, 3, 3), dtype=torch.uint8)
    v = dequantize(x, torch.Generator().manual_seed(0))
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(v, (x.float() + u) / 256, rtol=0, atol=0)
    assert ((v * 256).floor() == x).all() and (v < 1).all()
    assert dequantize_logdet(784) == pytest.approx(-784 * math.log(256))


def test_logit_transform_against_autograd_and_its_inverse():
    x = torch.rand(3, 2, 4, dtype=torch.float64)
    for alpha in (0.05, 1e-6):
        y, ld = logit_transform(x, alpha)
        s = alpha + (1 - 2 * alpha) * x
        torch.testing.assert_close(y, torch.log(s / (1 - s)))
        # Elementwise, so the log-det is the sum of log dy/dx, here by autograd.
        xr = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(logit_transform(xr, alpha)[0].sum(), xr)
        torch.testing.assert_close(ld, grad.log().flatten(1).sum(1))
        torch.testing.assert_close(logit_inverse(y, alpha), x)
    # The defaults are the flow's default squeeze.
    alpha = FlowConfig().alpha
    torch.testing.assert_close(logit_transform(x)[1], logit_transform(x, alpha)[1], rtol=0,
                               atol=0)
    torch.testing.assert_close(logit_inverse(y), logit_inverse(y, alpha), rtol=0, atol=0)

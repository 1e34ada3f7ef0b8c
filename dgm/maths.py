"""The small amount of probability that every model shares.

One home for closed-form KL, log-densities, log-mean-exp estimators, the
nats <-> bits/dim conversion and the flows' pre-processing (dequantisation and
the logit transform with their log-determinants), so that each is written (and
tested) once.
"""

import math

import torch
import torch.nn.functional as F

__all__ = [
    "LOG_2PI",
    "bernoulli_log_prob",
    "bits_per_dim",
    "diag_normal_log_prob",
    "dequantize",
    "dequantize_logdet",
    "kl_std_normal",
    "log_mean_exp_stats",
    "logit_inverse",
    "logit_transform",
    "std_normal_log_prob",
]

LOG_2PI = math.log(2 * math.pi)


def kl_std_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)), summed over the last dimension.

    1/2 [sum s + mu^T mu - d - sum log s] with s the variances (the report's
    eqs. 24-25 wrongly use 1/s). Written with expm1 so that it stays exact for
    variances near 1, where the naive form cancels catastrophically.

    Shapes: mu, logvar (..., D) -> (...).
    """
    return 0.5 * (torch.expm1(logvar) - logvar + mu.square()).sum(-1)


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log Bern(x | sigmoid(logits)) summed over all but the first dimension. (B, ...) -> (B,)."""
    nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    return -nll.flatten(1).sum(1)


def diag_normal_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
                         ) -> torch.Tensor:
    """log N(z | mu, diag(exp(logvar))) summed over the last dimension; shapes broadcast,
    (..., D) -> (...)."""
    return -0.5 * ((z - mu).square() * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


def std_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z | 0, I) summed over all but the first dimension. (B, ...) -> (B,)."""
    return -0.5 * (z.square() + LOG_2PI).flatten(1).sum(1)


def bits_per_dim(nll_nats: torch.Tensor | float, num_dims: int) -> torch.Tensor | float:
    """Convert a negative log-likelihood in nats per example to bits per dimension."""
    return nll_nats / (num_dims * math.log(2))


def log_mean_exp_stats(log_w: torch.Tensor, groups: int = 10
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Importance-sampling summary of k log-weights along dim 0.

    Returns ``(log mean w, stderr, ess)``, each of shape log_w.shape[1:]:

    - the estimate log (1/k) sum_i w_i;
    - its standard error from ``groups`` independent sub-estimates (batch means):
      std_j(log mean of group j) / sqrt(groups). Unlike the delta method, which
      saturates near 1 nat when one weight dominates, this shows how far apart
      independent runs of a heavy-tailed estimator land (NaN when k < 2);
    - the effective sample size (sum w)^2 / sum w^2, near 1 when one weight dominates.
    """
    k = log_w.shape[0]
    log_sum = torch.logsumexp(log_w, 0)
    ess = torch.exp(2 * log_sum - torch.logsumexp(2 * log_w, 0))
    m = min(groups, k)
    if m < 2:
        stderr = torch.full_like(log_sum, math.nan)
    else:
        per = k // m
        sub = torch.logsumexp(log_w[: m * per].unflatten(0, (m, per)), 1) - math.log(per)
        stderr = sub.std(0) / math.sqrt(m)
    return log_sum - math.log(k), stderr, ess


def dequantize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantisation of 8-bit images: (x + u) / 256, u ~ U[0, 1)^D.

    For any density q on [0, 1)^D, E_u[log q((x + u) / 256)] - D log 256 is a lower
    bound on log P(x) of the discrete image (Theis et al., 2016, section 3.1; the
    report's Gaussian noise gives no such bound). Shapes: uint8 (B, ...) -> float (B, ...).
    """
    u = torch.rand(x.shape, generator=generator, device=x.device)
    return (x.float() + u) / 256.0


def dequantize_logdet(num_dims: int) -> float:
    """log |det| of the scaling v -> v / 256 from intensity units to [0, 1): -D log 256.

    Added to a density of the scaled image, it gives the density on the 0..256
    intensity scale, whose log is the bound on the 8-bit image's log-probability.
    """
    return -num_dims * math.log(256.0)


def logit_transform(x: torch.Tensor, alpha: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """y = logit(alpha + (1 - 2 alpha) x), the pre-processing of RealNVP (Dinh et al., 2017, 4.1).

    The squeeze by alpha keeps y finite at x = 0 or 1. Returns ``(y, logabsdet)`` with
    logabsdet summed per example: sum_i log(1 - 2 alpha) - log s_i - log(1 - s_i),
    s = alpha + (1 - 2 alpha) x, since d logit(s)/ds = 1 / (s (1 - s)).
    Shapes: (B, ...) -> (B, ...), (B,).
    """
    s = alpha + (1 - 2 * alpha) * x
    y = torch.log(s) - torch.log1p(-s)
    # log s + log(1 - s) = -softplus(-y) - softplus(y), stable where s is near 0 or 1.
    ld = math.log1p(-2 * alpha) + F.softplus(-y) + F.softplus(y)
    return y, ld.flatten(1).sum(1)


def logit_inverse(y: torch.Tensor, alpha: float = 1e-6) -> torch.Tensor:
    """Inverse of :func:`logit_transform`: x = (sigmoid(y) - alpha) / (1 - 2 alpha)."""
    return (torch.sigmoid(y) - alpha) / (1 - 2 * alpha)

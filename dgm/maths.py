"""The small amount of probability that every model shares.

One home for closed-form KL, log-densities, log-mean-exp estimators and the
nats <-> bits/dim conversion, so that each is written (and tested) once.
"""

import math

import torch
import torch.nn.functional as F

__all__ = [
    "LOG_2PI",
    "bernoulli_log_prob",
    "bits_per_dim",
    "kl_std_normal",
    "log_mean_exp_stats",
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

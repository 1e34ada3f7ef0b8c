"""Variational dequantisation (Ho et al., 2019, Flow++, section 3.1).

A flow of 8-bit images models a density p over the continuous cube; the probability of
a discrete image x is P(x) = integral over u in [0, 1)^D of p(x + u). Uniform noise u
gives the bound E_u[log p(x + u)] <= log P(x). A learned q(u|x) gives the tighter
E_q[log p(x + u) - log q(u|x)] <= log P(x), with equality when q(u|x) is p(x + u) / P(x):
the flow no longer has to spread its density evenly over each cube.
"""

import torch
from torch import nn

from dgm.maths import std_normal_log_prob
from dgm.models.transforms import AffineCoupling, Shape

__all__ = ["VariationalDequantizer"]


def _log_sigmoid_grad(y: torch.Tensor) -> torch.Tensor:
    """log d sigmoid(y) / dy = log sigmoid(y) + log sigmoid(-y), summed per example."""
    return -(nn.functional.softplus(-y) + nn.functional.softplus(y)).flatten(1).sum(1)


class VariationalDequantizer(nn.Module):
    """q(u|x) on (0, 1)^(C, H, W): eps ~ N(0, I), affine couplings conditioned on features
    of x, then a sigmoid.

    Arguments:
        shape: (C, H, W) of the images.
        hidden_dim: channels of the feature net and of each coupling's conditioner.
        num_couplings: couplings, alternating checkerboard parity.

    Example:
        >>> q = VariationalDequantizer((1, 4, 4), hidden_dim=8)
        >>> x = torch.randint(0, 256, (3, 1, 4, 4)) / 256
        >>> u, log_q = q(x)
        >>> u.shape, log_q.shape, bool(((u > 0) & (u < 1)).all())
        (torch.Size([3, 1, 4, 4]), torch.Size([3]), True)
        >>> torch.allclose(q.log_prob(u, x), log_q, atol=1e-4)
        True
    """

    def __init__(self, shape: Shape, hidden_dim: int = 32, num_couplings: int = 2):
        super().__init__()
        c = shape[0]
        self.shape = tuple(shape)
        self.features = nn.Sequential(
            nn.Conv2d(c, hidden_dim, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1), nn.ReLU())
        self.couplings = nn.ModuleList(
            AffineCoupling(self.shape, "checkerboard", i % 2, "conv", hidden_dim, 1,
                           context_channels=hidden_dim) for i in range(num_couplings))

    def _context(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(2 * x - 1).to(x.dtype)  # images in [0, 1) -> about [-1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A draw u ~ q(u|x) and log q(u|x): x (B, C, H, W) on the 8-bit grid / 256 ->
        u (B, C, H, W) in (0, 1), log q (B,)."""
        context = self._context(x)
        eps = torch.randn_like(x)
        y, logdet = eps, x.new_zeros(len(x))
        for coupling in self.couplings:
            y, ld = coupling(y, context)
            logdet = logdet + ld
        return torch.sigmoid(y), std_normal_log_prob(eps) - logdet - _log_sigmoid_grad(y)

    def log_prob(self, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log q(u|x) of given u in (0, 1): (B, C, H, W), (B, C, H, W) -> (B,)."""
        context = self._context(x)
        y = torch.log(u) - torch.log1p(-u)
        eps, logdet = y, x.new_zeros(len(x))
        for coupling in reversed(self.couplings):
            eps, ld = coupling.inverse(eps, context)
            logdet = logdet + ld  # log |d eps / d y|
        return std_normal_log_prob(eps) + logdet - _log_sigmoid_grad(y)


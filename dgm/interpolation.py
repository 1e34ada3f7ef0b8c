"""Paths through a latent space (report Figure 6), for any model with a Gaussian prior.

Model-agnostic: these functions take and return latent tensors only; a caller turns
them into images with the model's ``generate(z)``.
"""

import torch

__all__ = ["METHODS", "interpolate", "interpolation_rows"]

METHODS = ("cdf", "slerp")


def interpolate(start: torch.Tensor, end: torch.Tensor, steps: int,
                method: str = "cdf") -> torch.Tensor:
    """``steps`` equidistant points from ``start`` to ``end``: (*S), (*S) -> (steps, *S).

    ``cdf`` is the report's path: a straight line between Phi(start) and Phi(end) in the
    unit cube, mapped back through the inverse normal CDF Phi^-1, so every point is as
    typical under N(0, I) per coordinate as the ends. ``slerp`` is spherical
    interpolation (Shoemake, 1985; White, 2016), which keeps the norm near that of typical
    Gaussian draws instead of cutting through the low-norm centre.

    The first and last points are exactly ``start`` and ``end`` (copied, not recomputed),
    so consecutive paths join without a seam.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if steps < 2:
        raise ValueError(f"steps must be at least 2, not {steps}")
    if start.shape != end.shape:
        raise ValueError(f"start {tuple(start.shape)} and end {tuple(end.shape)} differ in shape")
    a, b = start.reshape(-1).double(), end.reshape(-1).double()  # float64: Phi and acos lose
    t = torch.linspace(0, 1, steps, dtype=torch.float64, device=start.device)[:, None]
    if method == "cdf":
        path = torch.special.ndtri(torch.lerp(torch.special.ndtr(a), torch.special.ndtr(b), t))
    else:
        cos = torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-300)
        omega = torch.acos(cos.clamp(-1, 1))
        if torch.sin(omega) < 1e-6 or a.norm() * b.norm() == 0:
            # Parallel, opposite (always so in one dimension) or at the origin: no single
            # great circle joins them, so take the straight line, through the origin if need be.
            path = torch.lerp(a, b, t)
        else:
            path = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    path = path.to(start.dtype).view(steps, *start.shape)
    path[0], path[-1] = start, end
    return path


def interpolation_rows(rows: int, steps: int, latent_shape: tuple[int, ...],
                       method: str = "cdf", generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """Latents for a picture of ``rows`` paths of ``steps`` points each: (rows * steps, *shape).

    Draws rows + 1 points from N(0, I) (for ``cdf`` as Phi^-1 of a uniform point in the unit
    cube, as the report does; the same distribution); row r runs from point r to point
    r + 1, so each row starts where the previous one ended.
    """
    u = torch.rand(rows + 1, *latent_shape, generator=generator, device=device,
                   dtype=torch.float64)
    # Keep u off 0 and 1, where Phi^-1 is infinite.
    points = torch.special.ndtri(u.clamp(1e-12, 1 - 1e-12)).float()
    return torch.cat([interpolate(points[r], points[r + 1], steps, method)
                      for r in range(rows)])

"""The optimiser every model uses, built once so that each gets the fastest kernel."""

from collections.abc import Iterable

import torch

__all__ = ["adam"]


def adam(params: Iterable, lr: float, betas: tuple[float, float] = (0.9, 0.999)
         ) -> torch.optim.Adam:
    """Adam with the fused kernel where this torch has one, else the multi-tensor one.

    For these small models the per-parameter loop of the default Adam costs as much as
    the network: on 2 CPU cores a VAE step's update took 2.5 ms unfused, 0.26 ms fused.
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch: no fused kernel here
        return torch.optim.Adam(params, lr=lr, betas=betas, foreach=True)

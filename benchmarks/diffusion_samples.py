"""Samples of a diffusion run for comparisons that `dgm sample` does not offer: the raw
weights against the averaged ones, and other time grids for the sampler, written as an .npz
that `dgm score` reads. One thread; pin it to a core:

    taskset -c 0 python benchmarks/diffusion_samples.py RUN OUT.npz [--weights raw]
        [--grid uniform|cosine|edm7|edm3|...] [--sampler ddim|ddpm] [--steps 25] [-n 1000]
    dgm score OUT.npz --dataset fashion-mnist --json

--grid uniform is dgm's (equal steps of t); edmRHO spaces sigma / alpha = exp(gamma / 2) as
Karras et al. (2022, eq. 5) do, with rho = RHO, and cosine takes equal steps of the cosine
schedule's time (Nichol & Dhariwal, 2021), each between the schedule's two ends. With
--weights averaged --grid uniform --sampler ddim and the seed, the images are exactly
`dgm sample RUN --checkpoint last -n N --seed 1234`'s.
"""

import argparse

import numpy as np
import torch

import dgm
from dgm.config import from_dict
from dgm.models.diffusion import Diffusion, alpha_sigma


def time_grid(model: Diffusion, kind: str, steps: int) -> np.ndarray:
    """steps + 1 times from 1 down to 0."""
    if kind == "uniform":
        return np.linspace(1, 0, steps + 1)
    if not kind.startswith(("edm", "cosine")) or model.schedule.kind != "linear":
        raise SystemExit(f"--grid {kind}: uniform, or edmRHO or cosine on the linear schedule")
    gmin, gmax = model.schedule.gamma_min, model.schedule.gamma_max
    if kind == "cosine":  # equal steps of the cosine schedule's time between the same ends
        lo, hi = (2 / np.pi * np.arctan(np.exp(g / 2)) for g in (gmin, gmax))
        gamma = 2 * np.log(np.tan(np.pi / 2 * np.linspace(hi, lo, steps + 1)))
    else:
        rho = float(kind[3:])
        hi, lo = np.exp(gmax / 2) ** (1 / rho), np.exp(gmin / 2) ** (1 / rho)
        gamma = 2 * rho * np.log(hi + np.linspace(0, 1, steps + 1) * (lo - hi))
    t = (gamma - gmin) / (gmax - gmin)  # the linear schedule's inverse
    t[0], t[-1] = 1.0, 0.0
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("--weights", choices=("averaged", "raw"), default="averaged")
    p.add_argument("--grid", default="uniform")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.weights == "averaged":
        model = dgm.load(a.run, checkpoint="last")
    else:
        ckpt = torch.load(f"{a.run}/checkpoints/last.pt", weights_only=False, map_location="cpu")
        cfg = from_dict("diffusion", ckpt["config"], recorded=True)
        model = Diffusion.from_config(cfg, tuple(ckpt["image_shape"]))
        model.load_state_dict(ckpt["state_dict"])
        model.eval()
    ts = time_grid(model, a.grid, a.steps)
    print(f"{a.weights} weights, {a.sampler}, t grid {np.round(ts, 3).tolist()}")
    g = torch.Generator().manual_seed(a.seed)
    alpha_0, _ = alpha_sigma(model._gamma(torch.zeros(())))
    images = []
    with torch.no_grad():
        for start in range(0, a.n, 100):  # dgm sample's batches, so the noise is the same
            z = torch.randn(min(100, a.n - start), *model.image_shape, generator=g)
            for t, s in zip(ts[:-1], ts[1:], strict=True):
                z = (model.ancestral_step(z, float(t), float(s), g) if a.sampler == "ddpm"
                     else model.ddim_step(z, float(t), float(s)))
            images.append(((z / alpha_0).clamp(-1, 1) + 1) / 2)
    np.savez(a.out, samples=torch.cat(images)[:, 0].numpy().astype(np.float32))


if __name__ == "__main__":
    main()

"""Samples of a diffusion run from its raw (not averaged) weights, which `dgm sample` does not
offer, or from its averaged ones, as an .npz that `dgm score` reads. One thread; pin it:

    taskset -c 0 python benchmarks/diffusion_samples.py RUN OUT.npz [--weights raw]
        [--sampler ddim|ddpm] [--steps 25] [--rho 0] [--eta 0] [-n 1000] [--seed 1234]
    dgm score OUT.npz --dataset fashion-mnist --json

The images are drawn as `dgm sample` draws them, so with --weights averaged they are
exactly `dgm sample RUN --checkpoint last -n N --seed S
--sample-steps STEPS --sample-rho RHO --sample-eta ETA`'s.
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from dgm.evaluate import load_model
from dgm.quality import draw_samples
from dgm.runs import load_checkpoint, load_weights


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("--weights", choices=("averaged", "raw"), default="averaged")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--rho", type=float, default=0.0, help="the sampler's --sample-rho")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's eta, the --sample-eta")
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args()
    torch.set_num_threads(1)
    name, _, model, _ = load_model(a.run, "last", "cpu")  # the averaged weights, if any
    if a.weights == "raw":
        path = Path(a.run) / "checkpoints" / "last.pt"
        load_weights(model, load_checkpoint(path, name, map_location="cpu"), path)
    model.sampler, model.sample_steps, model.sample_rho = a.sampler, a.steps, a.rho
    model.sample_eta = a.eta
    print(f"{a.weights} weights, {a.sampler}, t grid "
          f"{np.round(model.time_grid(a.steps), 3).tolist()}")
    g = torch.Generator().manual_seed(a.seed)
    images = draw_samples(lambda n, gen: model.sample(n, generator=gen), a.n, g)
    np.savez(a.out, samples=images[:, 0].numpy().astype(np.float32))


if __name__ == "__main__":
    main()

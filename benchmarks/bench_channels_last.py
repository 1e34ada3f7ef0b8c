"""What the channels-last memory format buys each recipe's training step on this CPU: img/s
with the networks and the batch in the default (NCHW) layout against channels-last (NHWC),
in one run, the two timed in alternating windows (best of --repeats each), on random images
of the recipe's shape.

    taskset -c 0 python benchmarks/bench_channels_last.py [--recipes vae,gan,flow,diffusion]
        [--seconds 10] [--repeats 4] [--threads 1]

oneDNN runs a convolution in channels-last when its input or its weight is in it, so
converting the model's parameters (``model.to(memory_format=torch.channels_last)``) and the
batch is the whole change. A model whose code needs the default layout (a ``view`` of a
permuted tensor) fails here and is reported as such.
"""

import argparse
from pathlib import Path

import torch

from dgm.bench import _timed, matmul_rate, model_and_batch, read_recipe

ROOT = Path(__file__).resolve().parents[1]


def training_step(name: str, cfg, channels_last: bool):
    model, optimizers, x, gen = model_and_batch(name, cfg)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    def step():
        batch = model.prepare(x, gen)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        model.training_step(batch, optimizers)
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="vae,gan,flow,diffusion")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 1024^3 fp32 matmul "
          f"{matmul_rate() / 1e9:.1f} GFLOP/s")
    print("| recipe | batch | NCHW img/s | channels-last img/s | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.recipes.split(","):
        _, cfg = read_recipe(ROOT / "recipes" / f"{name}-fashion-mnist.yaml")
        steps = {layout: training_step(name, cfg, layout) for layout in (False, True)}
        best = {False: float("inf"), True: float("inf")}
        try:
            for r in range(args.repeats):
                # Each layout goes first in every other window: the window after another
                # ran measurably faster here (about 9 % for the VAE, which has no 4-D tensor
                # for the layout to change: its row is the control).
                for layout in (False, True) if r % 2 == 0 else (True, False):
                    best[layout] = min(best[layout], _timed(steps[layout], args.seconds))
        except RuntimeError as e:
            print(f"| {name} | {cfg.batch_size} | | fails: {str(e).splitlines()[0]} | |")
            continue
        a, b = (cfg.batch_size / best[layout] for layout in (False, True))
        print(f"| {name} | {cfg.batch_size} | {a:.1f} | {b:.1f} | {b / a:.2f} |", flush=True)


if __name__ == "__main__":
    main()

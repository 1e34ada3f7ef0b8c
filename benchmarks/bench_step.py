"""What a change of precision, memory layout or compiling buys each recipe's training step on
this machine: img/s of each variant in one run, timed in alternating windows (best of
--repeats each), on random images of the recipe's shape.

    python benchmarks/bench_step.py [--recipes vae,gan,flow,diffusion]
        [--variants fp32,bf16,bf16+cl,bf16+compile] [--seconds 10] [--repeats 3] [--threads 0]

A variant is a precision (fp32, or bf16: the trainer's autocast, ``dgm.distributed.autocast``)
with optional ``+cl`` (the networks and the batch in channels-last, the layout oneDNN
then runs its convolutions in) and ``+compile`` (each child network compiled, as
``--compile`` does in ``dgm.train._loop``; its compile time is left out of the windows and
printed). Ratios are against the first variant. The windows rotate their order each
repeat: the window after another ran measurably faster on one machine (about 9 % for the
VAE, which has no 4-D tensor for a layout to change).
"""

import argparse
import time
from pathlib import Path

import torch

from dgm.bench import _timed, matmul_rate, model_and_batch, read_recipe
from dgm.distributed import autocast, cpu_has_native_bf16

ROOT = Path(__file__).resolve().parents[1]


def training_step(name: str, cfg, variant: str):
    precision, *flags = variant.split("+")
    model, optimizers, x, gen = model_and_batch(name, cfg)
    if "cl" in flags:
        model.to(memory_format=torch.channels_last)
    if "compile" in flags:
        for child in model.children():
            child.compile()
    device = torch.device("cpu")

    def step():
        batch = model.prepare(x, gen)
        if "cl" in flags:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            model.training_step(batch, optimizers)
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="vae,gan,flow,diffusion")
    p.add_argument("--variants", default="fp32,bf16,bf16+cl,bf16+compile")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 1024^3 matmul fp32 "
          f"{matmul_rate() / 1e9:.1f} GFLOP/s"
          + (f", bf16 {matmul_rate(torch.bfloat16) / 1e9:.1f} GFLOP/s (native)"
             if cpu_has_native_bf16() else ", bf16 not native"))
    print("| recipe | batch | " + " | ".join(f"{v} img/s" for v in variants) + " | "
          + " | ".join(f"{v} / {variants[0]}" for v in variants[1:]) + " |")
    print("|" + " --- |" * (2 + 2 * len(variants) - 1))
    for name in args.recipes.split(","):
        _, cfg = read_recipe(ROOT / "recipes" / f"{name}-fashion-mnist.yaml")
        steps, notes = {}, []
        for v in variants:
            t0 = time.perf_counter()
            steps[v] = training_step(name, cfg, v)
            steps[v]()  # the first call compiles
            if "compile" in v:
                notes.append(f"{v}: first step {time.perf_counter() - t0:.0f} s (compiling)")
        best = dict.fromkeys(variants, float("inf"))
        for r in range(args.repeats):
            for v in variants[r % len(variants):] + variants[:r % len(variants)]:
                best[v] = min(best[v], _timed(steps[v], args.seconds))
        ips = [cfg.batch_size / best[v] for v in variants]
        print(f"| {name} | {cfg.batch_size} | " + " | ".join(f"{i:.1f}" for i in ips) + " | "
              + " | ".join(f"{i / ips[0]:.2f}" for i in ips[1:]) + " |"
              + (f"  ({'; '.join(notes)})" if notes else ""), flush=True)


if __name__ == "__main__":
    main()

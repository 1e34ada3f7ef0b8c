"""What ``--compile`` buys each recipe's model: compile time and training img/s, eager
against compiled, in one run on random images of the recipe's shape.

    taskset -c 1 python benchmarks/bench_compile.py [--recipes vae,gan,flow,diffusion]
        [--seconds 20] [--threads 1]

The compiled model is what the trainer runs with ``--compile``: each child network of the
model compiled (``dgm.train._loop``), after the data-dependent initialisation. Compile time
is the first training step's wall time less an eager step's. It also counts the graphs
dynamo made and any graph breaks: a graph break or a hit recompile limit means eager
fallback for part of the model.
"""

import argparse
import time
from pathlib import Path

import torch
import torch._dynamo

from dgm.bench import _timed, matmul_rate, model_and_batch, read_recipe

ROOT = Path(__file__).resolve().parents[1]


def training_step(name: str, cfg):
    """The model and one training step of it on a fixed random batch."""
    model, optimizers, x, gen = model_and_batch(name, cfg)
    return model, lambda: model.training_step(model.prepare(x, gen), optimizers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", default="vae,gan,flow,diffusion")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 1024^3 fp32 matmul "
          f"{matmul_rate() / 1e9:.1f} GFLOP/s")
    print("| recipe | batch | eager img/s | compiled img/s | compiled / eager | compile s "
          "| graphs | graph breaks |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.recipes.split(","):
        _, cfg = read_recipe(ROOT / "recipes" / f"{name}-fashion-mnist.yaml")
        _, step = training_step(name, cfg)
        eager_s = _timed(step, args.seconds)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model, step = training_step(name, cfg)
        for child in model.children():
            child.compile()
        t0 = time.perf_counter()
        step()
        compile_s = time.perf_counter() - t0 - eager_s
        compiled_s = _timed(step, args.seconds)
        stats = torch._dynamo.utils.counters
        graphs = stats["stats"]["unique_graphs"]
        breaks = sum(stats["graph_break"].values())
        print(f"| {name} | {cfg.batch_size} | {cfg.batch_size / eager_s:.1f} | "
              f"{cfg.batch_size / compiled_s:.1f} | {eager_s / compiled_s:.2f} | "
              f"{compile_s:.0f} | {graphs} | {breaks} |", flush=True)


if __name__ == "__main__":
    main()

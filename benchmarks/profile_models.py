"""Where a recipe's training step spends its time, and what bf16 could buy there.

bf16 autocast on a CPU speeds up only the matrix multiplies and convolutions (oneDNN's
AVX512-BF16/AMX kernels); everything else (activations, BatchNorm, the optimiser's
element-wise update, the loss) runs as before, plus the casts. So the fraction f of a
step's time in those dense kernels bounds the gain: at most 1 / ((1 - f) + f / r) for a
dense speed-up r (Amdahl). r = 2.24 is the bf16/fp32 matmul ratio measured on an
AVX512-BF16 EPYC (issue 21); pass --ratio to use another.

    taskset -c 0 python benchmarks/profile_models.py recipes/vae-fashion-mnist.yaml \
        recipes/gan-fashion-mnist.yaml --threads 1
"""

import argparse
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from dgm.bench import model_and_batch, read_recipe

DENSE = re.compile(r"aten::(mm|addmm|bmm|baddbmm|.*conv.*)$")


def profile_recipe(path: Path, steps: int) -> dict:
    name, cfg = read_recipe(path)
    model, optimizers, x, gen = model_and_batch(name, cfg)
    for _ in range(3):  # warm-up: oneDNN primitive caches, Adam's state
        model.training_step(model.prepare(x, gen), optimizers)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            model.training_step(model.prepare(x, gen), optimizers)
    self_us: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        self_us[e.key] += e.self_cpu_time_total
    total = sum(self_us.values())
    dense = sum(t for k, t in self_us.items() if DENSE.match(k))
    top = sorted(self_us.items(), key=lambda kv: -kv[1])[:10]
    return {"recipe": path.name, "ms_per_step": total / steps / 1e3,
            "img_per_s": cfg.batch_size * steps / (total / 1e6),
            "dense_fraction": dense / total,
            "top": [(k, t / total, bool(DENSE.match(k))) for k, t in top]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipes", nargs="+", type=Path)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--ratio", type=float, default=2.24,
                   help="bf16/fp32 speed of the dense kernels (default 2.24, issue 21)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    for path in args.recipes:
        r = profile_recipe(path, args.steps)
        f = r["dense_fraction"]
        bound = 1 / ((1 - f) + f / args.ratio)
        print(f"\n{r['recipe']}: {r['ms_per_step']:.1f} ms a step ({r['img_per_s']:.0f} img/s "
              f"under the profiler); matmul + convolution {100 * f:.1f}% of the time; "
              f"bf16 at {args.ratio}x on those gives at most {bound:.2f}x")
        print("| op (self time) | share | dense |\n| --- | ---: | --- |")
        for k, share, dense in r["top"]:
            print(f"| `{k}` | {100 * share:.1f}% | {'yes' if dense else ''} |")


if __name__ == "__main__":
    main()

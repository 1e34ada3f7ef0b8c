"""The diffusion U-Net's speed on this CPU: training and forward images per second at
batch 64 for 1 and 2 residual blocks per level, beside the machine's 1024^3 fp32 matmul
rate. One thread; pin it to a core for numbers that mean something:

    taskset -c 1 python benchmarks/bench_diffusion.py
"""

import time

import torch

from dgm.config import DiffusionConfig
from dgm.models.diffusion import Diffusion


def matmul_gflops(n: int = 1024, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"matmul 1024^3 fp32: {matmul_gflops():.1f} GFLOP/s (one thread)")
    for blocks in (1, 2):
        model = Diffusion(num_res_blocks=blocks)
        opts = model.configure_optimizers(DiffusionConfig())
        x = model.prepare(torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8))
        model.training_step(x, opts)  # warm-up
        t = time.perf_counter()
        for _ in range(3):
            model.training_step(x, opts)
        train = 3 * 64 / (time.perf_counter() - t)
        model.eval()
        with torch.no_grad():
            t = time.perf_counter()
            model.net(x, torch.rand(64))
            forward = 64 / (time.perf_counter() - t)
        params = sum(p.numel() for p in model.parameters())
        print(f"num_res_blocks {blocks}: {params} parameters, training {train:.1f} img/s, "
              f"forward {forward:.1f} img/s")


if __name__ == "__main__":
    main()

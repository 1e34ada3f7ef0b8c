"""GAN quality per wall-clock: the Frechet score the report's GAN reaches on Fashion-MNIST
after a fixed training budget (training speed against a plain loop is in bench_speed.py).

Run: DGM_DATA_DIR=../shared/data python benchmarks/bench_gan.py [--budget 180]
(scored in the shipped Fashion-MNIST feature network, dgm/features.py).
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from dgm.config import GANConfig
from dgm.evaluate import evaluate_run
from dgm.train import train


def frechet_after(budget_s: float, out: Path) -> tuple[int, float, dict]:
    """Train the default GAN on Fashion-MNIST epoch by epoch until budget_s has passed."""
    cfg = GANConfig(dataset="fashion-mnist", epochs=0, sample_epochs=[], device="cpu")
    t0, epochs = time.perf_counter(), 0
    while time.perf_counter() - t0 < budget_s:
        epochs += 1
        cfg.epochs = epochs
        train("gan", cfg, out, resume=epochs > 1, quiet=True)
    elapsed = time.perf_counter() - t0
    return epochs, elapsed, evaluate_run(out, device="cpu", quiet=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=180, help="training seconds for the score")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        epochs, elapsed, res = frechet_after(args.budget, Path(tmp) / "budget")
        fd = res["frechet"]
        print(f"after {elapsed:.0f} s ({epochs} epochs): Frechet {fd['distance']:.2f} "
              f"(real-vs-real reference {fd['real_reference']:.2f}) in {fd['features']}, Parzen "
              f"{res['parzen']['log_px_nats']:.1f} nats")


if __name__ == "__main__":
    main()

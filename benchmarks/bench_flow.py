"""Flow quality per wall-clock: the validation bits/dim that dgm's RealNVP reaches in a
fixed training budget (training speed against a plain loop is in bench_speed.py).

    DGM_DATA_DIR=../shared/data python benchmarks/bench_flow.py --budget-s 300
"""

import argparse
import time

import torch

from dgm.config import FlowConfig
from dgm.data import load_split
from dgm.models.flow import RealNVP


def budget_run(cfg: FlowConfig, budget_s: float) -> tuple[int, int, float, float]:
    """Train with dgm's model and update rule until the budget is spent; return
    (steps, images seen, train seconds, validation bits/dim on the validation split)."""
    train_x, _ = load_split(cfg.dataset, cfg.train_split, cfg.data_dir)
    val_x, _ = load_split(cfg.dataset, cfg.val_split, cfg.data_dir)
    torch.manual_seed(cfg.seed)
    model = RealNVP.from_config(cfg)
    opts = model.configure_optimizers(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    val = model.prepare(val_x, torch.Generator().manual_seed(cfg.seed + 1))
    steps, t0 = 0, time.perf_counter()
    model.train()
    while time.perf_counter() - t0 < budget_s:
        perm = torch.randperm(len(train_x), generator=gen)
        for i in range(len(train_x) // cfg.batch_size):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            model.training_step(model.prepare(train_x[idx], gen), opts)
            steps += 1
            if time.perf_counter() - t0 >= budget_s:
                break
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        bpd = torch.cat([model.bits_per_dim(val[i:i + 500]) for i in range(0, len(val), 500)])
    return steps, steps * cfg.batch_size, seconds, bpd.mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--budget-s", type=float, default=300.0, help="wall-clock training budget")
    p.add_argument("--arch", default="conv", choices=("conv", "mlp"))
    args = p.parse_args()
    cfg = FlowConfig(dataset=args.dataset, data_dir=args.data_dir, arch=args.arch,
                     train_split="train[:90%]", val_split="train[90%:]")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, arch {cfg.arch}, "
          f"batch {cfg.batch_size}")

    if args.budget_s > 0:
        steps, seen, secs, bpd = budget_run(cfg, args.budget_s)
        print(f"budget: {secs:.0f} s of training on {cfg.dataset} {cfg.train_split}: {steps} "
              f"steps, {seen} images ({seen / secs:.1f} img/s); validation bits/dim on "
              f"{cfg.val_split}: {bpd:.4f}")


if __name__ == "__main__":
    main()

"""Flow benchmark: dgm's training epoch against a plain pytorch/examples-style loop, and the
validation bits/dim that dgm's RealNVP reaches in a fixed wall-clock budget.

Usage (from the repository root; one intra-op thread is far faster than two on a shared
2-core machine, where OpenMP threads spin against other processes):

    OMP_NUM_THREADS=1 python benchmarks/bench_flow.py --dataset fashion-mnist --budget-s 300
"""

import argparse
import time

import torch
from torch.utils.data import DataLoader, Dataset

from dgm.config import FlowConfig
from dgm.data import load_split
from dgm.flow import RealNVP
from dgm.maths import dequantize
from dgm.train import _train_epoch


class Images(Dataset):
    """uint8 images served one by one, as torchvision's MNIST would."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def reference_epoch(model: RealNVP, x: torch.Tensor, cfg: FlowConfig) -> float:
    """A training epoch written like pytorch/examples: DataLoader, loss, backward, step."""
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    loader = DataLoader(Images(x), batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    model.train()
    t0 = time.perf_counter()
    for batch in loader:
        loss = model.bits_per_dim(dequantize(batch)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def dgm_epoch(model: RealNVP, x: torch.Tensor, cfg: FlowConfig) -> float:
    opts = model.configure_optimizers(cfg)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    _train_epoch(model, opts, x, cfg, gen, torch.device("cpu"), 1, 0, True)
    return time.perf_counter() - t0


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
    p.add_argument("--images", type=int, default=1024, help="images per throughput epoch")
    p.add_argument("--budget-s", type=float, default=300.0, help="wall-clock training budget")
    p.add_argument("--arch", default="conv", choices=("conv", "mlp"))
    args = p.parse_args()
    cfg = FlowConfig(dataset=args.dataset, data_dir=args.data_dir, arch=args.arch,
                     train_split="train[:90%]", val_split="train[90%:]")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, arch {cfg.arch}, "
          f"batch {cfg.batch_size}")

    x, _ = load_split(cfg.dataset, f"train[:{args.images}]", cfg.data_dir)
    torch.manual_seed(0)
    model = RealNVP.from_config(cfg)
    model.train().log_prob(dequantize(x[:cfg.batch_size]))  # ActNorm init, outside the timing
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # Warm-up of both paths (allocator, oneDNN primitives), then the timed epochs.
    reference_epoch(model, x[:2 * cfg.batch_size], cfg)
    model.load_state_dict(state)
    t_ref = reference_epoch(model, x, cfg)
    model.load_state_dict(state)
    t_dgm = dgm_epoch(model, x, cfg)
    n = (len(x) // cfg.batch_size) * cfg.batch_size
    print(f"throughput: dgm {n / t_dgm:.1f} img/s, reference loop {n / t_ref:.1f} img/s, "
          f"ratio dgm/reference {t_ref / t_dgm:.3f} ({n} images each)")

    if args.budget_s > 0:
        steps, seen, secs, bpd = budget_run(cfg, args.budget_s)
        print(f"budget: {secs:.0f} s of training on {cfg.dataset} {cfg.train_split}: {steps} "
              f"steps, {seen} images ({seen / secs:.1f} img/s); validation bits/dim on "
              f"{cfg.val_split}: {bpd:.4f}")


if __name__ == "__main__":
    main()

"""GAN benchmark: dgm's training throughput against a plain loop, and quality per wall-clock.

1. Images per second of one dgm GAN epoch (the real trainer, checkpoint and pictures
   included) against a reference loop written the way pytorch/examples writes it
   (a ``torch.utils.data.DataLoader`` over a ``Dataset``, same networks and losses), in
   the same process, on the same images; prints the ratio.
2. The Frechet score (``dgm evaluate``) that the report's GAN reaches on Fashion-MNIST
   after a fixed wall-clock training budget.

Run: PYTHONPATH=. python benchmarks/bench_gan.py [--images 12800] [--budget 180]
(data from DGM_DATA_DIR; the feature classifier is trained once and cached).
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dgm.config import GANConfig
from dgm.data import load_split
from dgm.evaluate import evaluate_run
from dgm.gan import Discriminator, Generator
from dgm.train import train


class Images(Dataset):
    """One image at a time, scaled to [-1, 1], as torchvision's datasets + transforms do."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i].float() / 127.5 - 1


def reference_epoch(x: torch.Tensor, batch_size: int = 64) -> float:
    """One epoch of the plain loop; returns images per second."""
    netG, netD = Generator(), Discriminator()
    optG = torch.optim.Adam(netG.parameters(), lr=5e-4, betas=(0.5, 0.999))
    optD = torch.optim.Adam(netD.parameters(), lr=5e-4, betas=(0.5, 0.999))
    loader = DataLoader(Images(x), batch_size=batch_size, shuffle=True, drop_last=True)
    t0, n = time.perf_counter(), 0
    for real in loader:
        b = len(real)
        netD.zero_grad()
        fake = netG(torch.randn(b, 100))
        errD = F.binary_cross_entropy_with_logits(netD(real), torch.ones(b)) + \
            F.binary_cross_entropy_with_logits(netD(fake.detach()), torch.zeros(b))
        errD.backward()
        optD.step()
        netG.zero_grad()
        errG = F.binary_cross_entropy_with_logits(netD(netG(torch.randn(b, 100))),
                                                  torch.ones(b))
        errG.backward()
        optG.step()
        n += b
    return n / (time.perf_counter() - t0)


def dgm_epoch(n_images: int, out: Path) -> float:
    """One epoch through dgm's trainer on the first n_images; returns images per second."""
    cfg = GANConfig(dataset="fashion-mnist", train_split=f"train[:{n_images}]",
                    val_split="train[59000:]", epochs=1, sample_epochs=[], device="cpu")
    t0 = time.perf_counter()
    train("gan", cfg, out, quiet=True)
    return (n_images // cfg.batch_size) * cfg.batch_size / (time.perf_counter() - t0)


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
    p.add_argument("--images", type=int, default=12800, help="images in the timed epoch")
    p.add_argument("--budget", type=float, default=180, help="training seconds for the score")
    args = p.parse_args()
    torch.manual_seed(0)
    x, _ = load_split("fashion-mnist", f"train[:{args.images}]")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        ref = reference_epoch(x)
        ours = dgm_epoch(args.images, Path(tmp) / "epoch")
        print(f"images/s: dgm {ours:.0f}, reference DataLoader loop {ref:.0f}, "
              f"ratio {ours / ref:.2f}")
        epochs, elapsed, res = frechet_after(args.budget, Path(tmp) / "budget")
        fd = res["frechet"]
        print(f"after {elapsed:.0f} s ({epochs} epochs): Frechet {fd['distance']:.2f} "
              f"(real-vs-real reference {fd['real_reference']:.2f}), classifier accuracy "
              f"{res['classifier']['test_accuracy']:.4f}, Parzen "
              f"{res['parzen']['log_px_nats']:.1f} nats")


if __name__ == "__main__":
    main()

"""VAE training speed: dgm's trainer against a plain PyTorch-examples loop, in one run.

    DGM_DATA_DIR=../shared/data python benchmarks/bench_vae.py [--epochs 3]

Both sides train the same network (latent 20, hidden 500, batch 128) on the same
images. The reference loop is written the way pytorch/examples/vae does it: a
DataLoader over a Dataset whose items are converted to float tensors one by one.
The FLOP bound is the machine's measured matrix-multiply rate divided by the
model's multiply-adds per image (forward + backward = 3x forward).
"""

import argparse
import time
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dgm import VAE
from dgm.config import VAEConfig
from dgm.data import load_split
from dgm.train import _train_epoch


class ImageDataset(Dataset):
    """What torchvision's MNIST dataset does per item: a PIL image, then ToTensor()."""

    def __init__(self, images):
        self.images = images[:, 0].numpy()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        return torch.from_numpy(np.array(img, copy=True)).float().div(255).unsqueeze(0), 0


def reference_epoch(model, opt, images, batch_size):
    loader = DataLoader(ImageDataset(images), batch_size=batch_size, shuffle=True,
                        drop_last=True)
    model.train()
    for x, _ in loader:
        x = torch.bernoulli(x)
        mu, logvar = model.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        logits = model.decode(z)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, x.view(-1, 784), reduction="sum")
        kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        loss = (bce + kld) / len(x)
        opt.zero_grad()
        loss.backward()
        opt.step()


def matmul_rate(m=128, k=784, n=500, seconds=2.0) -> float:
    """Measured FLOP/s of fp32 matrix multiplies of the VAE's largest layer shape."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(20):
        a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(50):
            a @ b
        count += 50
    return 2 * m * k * n * count / (time.perf_counter() - t0)


def vae_flops_per_image(latent=20, hidden=500, data=784) -> int:
    macs = data * hidden + hidden * 2 * latent + latent * hidden + hidden * data
    return 3 * 2 * macs  # forward, and backward at about twice the forward


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--split", default="train")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    images, _ = load_split(args.dataset, args.split, offline=True)
    n = len(images) // args.batch_size * args.batch_size
    cfg = VAEConfig(batch_size=args.batch_size, epochs=args.epochs)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{len(images)} images, batch {args.batch_size}")

    def best_of(fn):
        times = []
        for _ in range(args.epochs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return n / min(times)

    torch.manual_seed(0)
    model = VAE(20, 500)
    opts = model.configure_optimizers(cfg)
    gen = torch.Generator().manual_seed(0)
    dgm_ips = best_of(lambda: _train_epoch(model, opts, images, cfg, gen, torch.device("cpu"),
                                           1, 0, quiet=True))
    torch.manual_seed(0)
    model = VAE(20, 500)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ref_ips = best_of(lambda: reference_epoch(model, opt, images, args.batch_size))
    rate = matmul_rate(args.batch_size)
    bound = rate / vae_flops_per_image()
    print(SimpleNamespace(dgm_images_per_s=round(dgm_ips),
                          reference_images_per_s=round(ref_ips),
                          matmul_gflops=round(rate / 1e9, 1),
                          flop_bound_images_per_s=round(bound)))
    print(f"dgm / reference = {dgm_ips / ref_ips:.2f}x;  dgm / FLOP bound = {dgm_ips / bound:.2f}")


if __name__ == "__main__":
    main()

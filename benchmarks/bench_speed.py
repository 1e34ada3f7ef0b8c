"""Training speed of every model: dgm against a plain loop and against the FLOP bound.

    DGM_DATA_DIR=../shared/data python benchmarks/bench_speed.py [--models vae,gan,flow]
        [--scaling] [--device cpu|cuda] [--precision fp32|bf16]

For each model, in one run and on the same Fashion-MNIST images:
- dgm: images per second of the trainer's epoch loop (``dgm.train._train_epoch``: batches
  by index from one uint8 tensor on the device, the model's own ``training_step``);
- reference: the pytorch/examples way, a DataLoader over a torchvision-style Dataset
  (a PIL image and ToTensor per item, then the model's usual scaling) and a hand-written
  training step, the same networks;
- FLOP bound: the machine's measured fp32 matrix-multiply rate (a 1024^3 sgemm) divided
  by the matmul/conv FLOPs of one training step per image (counted by
  ``torch.utils.flop_counter``, forward and backward).
``--scaling`` adds the VAE's time per epoch against data-set size and batch size, and
the peak resident memory.
"""

import argparse
import resource
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from dgm.bench import matmul_rate
from dgm.config import CONFIGS
from dgm.data import load_split
from dgm.maths import dequantize
from dgm.models import build_model
from dgm.train import _train_epoch

IMAGES = {"vae": 25600, "gan": 12800, "flow": 1024}  # about 10 s of dgm time each, on 2 cores


def step_flops(name: str, cfg, x: torch.Tensor, device) -> float:
    """Matmul/conv FLOPs of one training step, per image."""
    model = build_model(name, cfg).to(device)
    opts = model.configure_optimizers(cfg)
    batch = model.prepare(x[:cfg.batch_size].to(device))
    if hasattr(model, "initialize"):
        model.initialize(batch)
    with FlopCounterMode(display=False) as counter:
        model.training_step(batch, opts)
    return counter.get_total_flops() / cfg.batch_size


def dgm_ips(name: str, cfg, x: torch.Tensor, device, repeats: int = 3) -> float:
    torch.manual_seed(0)
    model = build_model(name, cfg).to(device)
    opts = model.configure_optimizers(cfg)
    x = x.to(device)
    gen = torch.Generator(device).manual_seed(0)
    if hasattr(model, "initialize"):
        model.initialize(model.prepare(x[:cfg.batch_size], gen))
    _train_epoch(model, opts, x[:len(x) // 4], cfg, gen, device, 1, 0, True)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        _train_epoch(model, opts, x, cfg, gen, device, 1, 0, True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return len(x) // cfg.batch_size * cfg.batch_size / best


class TorchvisionStyle(Dataset):
    """What torchvision's MNIST does per item: a PIL image, then ToTensor() to [0, 1]."""

    def __init__(self, images: torch.Tensor):
        self.images = images[:, 0].numpy()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i])
        return torch.from_numpy(np.array(img, copy=True)).float().div(255).unsqueeze(0), 0


def vae_step(model, opt, x):  # pytorch/examples/vae, with the data binarised
    x = torch.bernoulli(x)
    mu, logvar = model.encode(x)
    z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
    bce = F.binary_cross_entropy_with_logits(model.decode(z), x.view(len(x), -1),
                                             reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    loss = (bce + kld) / len(x)
    opt.zero_grad()
    loss.backward()
    opt.step()


def gan_step(model, opts, x):  # pytorch/examples/dcgan's loop, non-saturating G loss
    g, d = model.generator, model.discriminator
    real = x * 2 - 1
    b = len(real)
    ones, zeros = torch.ones(b), torch.zeros(b)
    opts["discriminator"].zero_grad()
    fake = g(torch.randn(b, model.latent_dim))
    err_d = F.binary_cross_entropy_with_logits(d(real), ones) + \
        F.binary_cross_entropy_with_logits(d(fake.detach()), zeros)
    err_d.backward()
    opts["discriminator"].step()
    opts["generator"].zero_grad()
    err_g = F.binary_cross_entropy_with_logits(d(g(torch.randn(b, model.latent_dim))), ones)
    err_g.backward()
    opts["generator"].step()


def flow_step(model, opt, x):  # the textbook flow loop: dequantise, -log p, step
    loss = model.bits_per_dim(dequantize((x * 255).round().to(torch.uint8))).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def reference_ips(name: str, cfg, x: torch.Tensor, repeats: int = 3) -> float:
    """A plain loop as pytorch/examples writes it: DataLoader, hand-written step (CPU)."""
    n = len(x) // cfg.batch_size * cfg.batch_size
    best = 0.0
    for _ in range(repeats):
        torch.manual_seed(0)
        model = build_model(name, cfg)
        if name == "gan":
            opts = {k: torch.optim.Adam(getattr(model, k).parameters(), lr=cfg.lr,
                                        betas=(cfg.beta1, cfg.beta2))
                    for k in ("generator", "discriminator")}
            step = gan_step
        else:
            opts = torch.optim.Adam(model.parameters(), lr=cfg.lr)
            step = vae_step if name == "vae" else flow_step
        if name == "flow":
            model.initialize(model.prepare(x[:cfg.batch_size]))
        loader = DataLoader(TorchvisionStyle(x), batch_size=cfg.batch_size, shuffle=True,
                            drop_last=True)
        model.train()
        t0 = time.perf_counter()
        for batch, _ in loader:
            step(model, opts, batch)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vae,gan,flow")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--scaling", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    x_all, _ = load_split("fashion-mnist", "train", offline=True)
    rate = matmul_rate(torch.bfloat16 if args.precision == "bf16" else torch.float32,
                       seconds=2.0, device=device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
          f"{args.precision}; measured matmul rate {rate / 1e9:.1f} GFLOP/s")
    print("| model | batch | images | dgm img/s | reference img/s | dgm / reference "
          "| MFLOP per image | FLOP-bound img/s | dgm / bound |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        cfg = CONFIGS[name](device=args.device, precision=args.precision)
        x = x_all[:IMAGES[name]]
        flops = step_flops(name, cfg, x, device)
        ours = dgm_ips(name, cfg, x, device)  # the trainer applies cfg.precision itself
        ref = reference_ips(name, cfg, x) if device.type == "cpu" else float("nan")
        bound = rate / flops
        print(f"| {name} | {cfg.batch_size} | {len(x)} | {ours:.0f} | {ref:.0f} | "
              f"{ours / ref:.2f} | {flops / 1e6:.2f} | {bound:.0f} | {ours / bound:.2f} |",
              flush=True)
    if args.scaling:
        cfg = CONFIGS["vae"](device=args.device)
        print("\nVAE seconds per epoch by data-set size (batch 128):")
        for n in (6400, 12800, 25600, 51200):
            ips = dgm_ips("vae", cfg, x_all[:n], device, repeats=1)
            print(f"  {n:6d} images: {n / ips:6.2f} s  ({ips:.0f} img/s)", flush=True)
        print("VAE images per second by batch size (25600 images):")
        for bs in (32, 64, 128, 256, 512, 1024):
            cfg = CONFIGS["vae"](device=args.device, batch_size=bs)
            ips = dgm_ips("vae", cfg, x_all[:25600], device, repeats=1)
            bound = rate / step_flops("vae", cfg, x_all, device)
            print(f"  batch {bs:4d}: {ips:6.0f} img/s, {ips / bound:.2f} of the FLOP bound",
                  flush=True)
    print(f"\npeak resident memory of this process: {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()

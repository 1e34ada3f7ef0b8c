"""``dgm bench``: how fast this machine trains each recipe, and how long each would take.

It measures the machine (a 1024^3 fp32 matrix multiply, and bf16 where the CPU has it
natively) and, for each recipe, the images per second of its own model's training step
and validation step on random images of the recipe's shape, then predicts the recipe's
wall time as epochs x (training images / training img/s + validation images /
validation img/s). Start-up, sample grids and checkpoints are left out: on 2 cores they
add about a second an epoch.
"""

import dataclasses
import math
import time
from pathlib import Path

import torch

from dgm.config import TrainConfig, from_dict
from dgm.data.splits import parse_split, slice_of
from dgm.distributed import autocast, cpu_has_native_bf16
from dgm.errors import DgmError
from dgm.models import build_model
from dgm.runs import read_yaml

__all__ = ["bench", "matmul_rate", "model_and_batch", "read_recipe", "recipe_files"]

# The built-in data sets' sizes and shape: what a recipe's splits count, without the data.
SIZES = {"train": 60000, "test": 10000}
SHAPE = (1, 28, 28)
# Options that do not change the cost of a step: recipes differing only in these share one
# measurement (the MNIST recipes and their Fashion-MNIST twins).
NOT_COST = {"dataset", "data_dir", "offline", "train_split", "val_split", "test_split",
            "epochs", "sample_epochs", "manifold_epochs", "seed", "patience", "tensorboard"}


def recipe_files(given: list[str]) -> list[Path]:
    """The recipes given, or every ``recipes/*.yaml`` of the current folder or dgm's checkout."""
    if given:
        return [Path(g) for g in given]
    for folder in (Path("recipes"), Path(__file__).resolve().parents[1] / "recipes"):
        found = sorted(folder.glob("*.yaml"))
        if found:
            return found
    raise DgmError("no recipes/*.yaml here or beside dgm; give recipe files: dgm bench "
                   "FILE.yaml ...")


def read_recipe(path: Path) -> tuple[str, TrainConfig]:
    """A recipe file's model name and its config."""
    values = read_yaml(path)
    values.pop("format_version", None)
    model_name = values.pop("model", None)
    if not isinstance(model_name, str):
        raise DgmError(f"{path} names no model (model: vae, gan, flow or diffusion)")
    return model_name, from_dict(model_name, values, source=str(path))


def matmul_rate(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 1.0,
                device: str | torch.device = "cpu") -> float:
    """FLOP/s of an n^3 matrix multiply in ``dtype``, over a window of ``seconds``."""
    device = torch.device(device)
    a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
    a @ b
    # A GPU queues its products: wait for them, ten at a time so that waiting costs little.
    batch, sync = (10, torch.cuda.synchronize) if device.type == "cuda" else (1, lambda: None)
    sync()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(batch):
            a @ b
        sync()
        count += batch
    return 2 * n ** 3 * count / (time.perf_counter() - t0)


def _split_size(spec: str) -> int:
    base, start, stop = parse_split(spec)
    return len(range(SIZES[base])[slice_of(SIZES[base], start, stop)])


def _timed(fn, seconds: float, least: int = 2) -> float:
    """Seconds per call of ``fn``, after one warm-up call, over at least ``least`` calls."""
    fn()
    count, t0 = 0, time.perf_counter()
    while count < least or time.perf_counter() - t0 < seconds:
        fn()
        count += 1
    return (time.perf_counter() - t0) / count


def model_and_batch(model_name: str, cfg) -> tuple:
    """A recipe's model in training mode, its optimisers, one batch of random uint8 images of
    its shape and a seeded generator, the model initialised from that batch as the trainer
    does: what one training step needs."""
    torch.manual_seed(0)
    model = build_model(model_name, cfg, SHAPE)
    optimizers = model.configure_optimizers(cfg)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (cfg.batch_size, *SHAPE), dtype=torch.uint8, generator=gen)
    if hasattr(model, "initialize"):
        model.initialize(model.prepare(x, gen))
    return model.train(), optimizers, x, gen


def speeds(model_name: str, cfg, precision: str, seconds: float) -> tuple[float, float]:
    """Training and validation images per second of one recipe's model, in ``precision``."""
    device = torch.device("cpu")
    model, optimizers, x, gen = model_and_batch(model_name, cfg)

    def train_step():  # what dgm.train._train_epoch does per batch
        with autocast(device, precision):
            model.training_step(model.prepare(x, gen), optimizers)

    train_s = _timed(train_step, seconds)
    model.eval()
    val_in = model.prepare(x, gen)

    @torch.no_grad()
    def val_step():
        with autocast(device, precision):
            model.validation_step(val_in)

    val_s = _timed(val_step, seconds / 2)
    return cfg.batch_size / train_s, cfg.batch_size / val_s


def bench(files: list[Path], seconds: float = 2.0) -> dict:
    """The machine's speed and each recipe's measured img/s and predicted wall time."""
    precisions = ["fp32"] + (["bf16"] if cpu_has_native_bf16() else [])
    result = {"threads": torch.get_num_threads(),
              "matmul_gflops": {"fp32": matmul_rate(seconds=min(1.0, seconds)) / 1e9},
              "bf16": "native" if "bf16" in precisions else
                      "not native on this CPU (no AVX512-BF16 or AMX): fp32 only",
              "recipes": []}
    if "bf16" in precisions:
        result["matmul_gflops"]["bf16"] = matmul_rate(torch.bfloat16,
                                                      seconds=min(1.0, seconds)) / 1e9
    measured = {}
    for path in files:
        model_name, cfg = read_recipe(path)
        if cfg.dataset not in ("mnist", "fashion-mnist"):
            raise DgmError(f"{path} trains on {cfg.dataset}; dgm bench predicts recipes on "
                           "the built-in data sets (mnist, fashion-mnist)")
        n_train = _split_size(cfg.train_split) // cfg.batch_size * cfg.batch_size
        n_val = _split_size(cfg.val_split)
        key = (model_name, tuple((k, repr(v)) for k, v in dataclasses.asdict(cfg).items()
                                 if k not in NOT_COST))
        row = {"recipe": str(path), "model": model_name, "epochs": cfg.epochs,
               "train_images": n_train, "val_images": n_val}
        for precision in precisions:
            if (key, precision) not in measured:
                measured[key, precision] = speeds(model_name, cfg, precision, seconds)
            train_ips, val_ips = measured[key, precision]
            epoch_s = n_train / train_ips + n_val / val_ips
            row[precision] = {"train_img_s": train_ips, "val_img_s": val_ips,
                              "epoch_s": epoch_s, "predicted_s": cfg.epochs * epoch_s}
        result["recipes"].append(row)
    return result


def _hours(seconds: float) -> str:
    minutes = math.ceil(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def format_bench(result: dict) -> str:
    rates = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in result["matmul_gflops"].items())
    lines = [f"machine: {result['threads']} threads; 1024^3 matmul {rates}; bf16 "
             f"{result['bf16']}",
             "predicted wall time of each recipe (training and validation; start-up, sample "
             "grids and checkpoints left out):"]
    for row in result["recipes"]:
        parts = [f"{p} {_hours(row[p]['predicted_s'])} ({row[p]['train_img_s']:.0f} train "
                 f"img/s, {row[p]['epoch_s']:.1f} s/epoch)"
                 for p in ("fp32", "bf16") if p in row]
        lines.append(f"  {row['recipe']}: {row['epochs']} epochs of {row['model']}: "
                     + "; ".join(parts))
    return "\n".join(lines)

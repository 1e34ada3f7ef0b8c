"""Trained models that ship with dgm, and packed runs: ``zoo:NAME`` or a file that
``dgm export`` wrote, wherever a run folder is read.

Each zoo model is a packed run (:func:`dgm.runs.pack_run`: its weights, config, metrics
and evaluations, in safetensors) under ``dgm/weights/zoo/``, pinned by its SHA-256, which
is checked on every load.
"""

import contextlib
import hashlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dgm.errors import DgmError
from dgm.runs import unpack_run

__all__ = ["ZOO", "ZooModel", "is_packed", "open_run", "zoo_file"]

ZOO_DIR = Path(__file__).parent / "weights" / "zoo"


@dataclass(frozen=True)
class ZooModel:
    name: str
    sha256: str
    data: str
    recipe: str  # the commands that trained and measured it
    results: str  # what it reproduces, as the README prints it
    # A quick check that the tests run: `dgm evaluate zoo:NAME ARGS` on a slice of the test
    # set, and the numbers it gave when the model was packed (JSON path -> value).
    check_args: tuple[str, ...] = ()
    check: dict = field(default_factory=dict)


ZOO: dict[str, ZooModel] = {m.name: m for m in (
    ZooModel(
        name="vae-report-fashion-mnist",
        sha256="6b737850356a83d98b9884fb88229d07a89ccf9ffc79f6b97a6dbf70d6165ab5",
        data="fashion-mnist, dynamically binarised: trained on train[:90%], validated on "
             "train[90%:]",
        recipe="dgm train vae --dataset fashion-mnist (the report's VAE: latent 20, one hidden "
               "layer of 500, 40 epochs; 369 s on one thread beside other jobs), then dgm "
               "evaluate RUN --iw-samples 100 --no-naive --sample-quality",
        results="test ELBO -238.02 +- 0.76 nats; IWAE k=100 -234.96 +- 0.76 nats (0.432 "
                "bits/dim); in dgm-fashion-mnist-cnn-v1: Frechet 101.68 (floor 0.13), "
                "precision 0.661 (floor 0.895), recall 0.569 (floor 0.897)",
        check_args=("--split", "test[:200]", "--iw-samples", "100", "--no-naive"),
        check={"elbo.log_px_nats": -232.59, "iwae.log_px_nats": -229.47}),
    ZooModel(
        name="vae-fashion-mnist",
        sha256="2ee28247f57d0c9db6e0890d8694e1cd1c2f3dcde1609153afb0292dc5986923",
        data="fashion-mnist, dynamically binarised: trained on train[:90%], validated on "
             "train[90%:]",
        recipe="dgm train vae --config recipes/vae-fashion-mnist.yaml (2x512, latent 40, "
               "IWAE k = 5, KL warm-up, cosine, 550 epochs; 1 h 23 min on 2 cores; best "
               "epoch 533), then dgm evaluate RUN --no-naive",
        results="test IWAE k=5000 -227.87 +- 0.76 nats (0.419 bits/dim; Monte-Carlo error "
                "0.15 nats an image, ESS 115); ELBO -233.39 +- 0.78",
        check_args=("--split", "test[:200]", "--iw-samples", "100", "--no-naive"),
        check={"elbo.log_px_nats": -226.26, "iwae.log_px_nats": -222.66}),
    ZooModel(
        name="gan-fashion-mnist",
        sha256="aca4eed4ed27ce2a259e1c55b7a9c863ecb068fd0100ee20a6661a98b39834c8",
        data="fashion-mnist in [-1, 1]: trained on train[:90%], validated on train[90%:]",
        recipe="dgm train gan --config recipes/gan-fashion-mnist.yaml (conv, 32 base "
               "channels, one 3x3 conv more a resolution, a minibatch-std channel in D, ns "
               "loss, D at 0.35 of G's rate, EMA 0.999 of G, 50 epochs in bf16, seed 0, before "
               "the nets went channels-last; 50 epochs now take 37 min on the 2 cores of an "
               "Intel Xeon with AMX, 973-1019 training img/s, 51-53 min then; this run took 88 "
               "min on one thread beside the seed-1 run), then dgm evaluate RUN",
        results="in dgm-fashion-mnist-cnn-v1, 10000 samples against the 10000 test images: "
                "Frechet 0.64 (floor 0.13), KID 1.5 +- 13.5 (floor -2.2), precision 0.861 "
                "(floor 0.895), recall 0.831 (floor 0.897)",
        check_args=("--split", "test[:200]", "--num-samples", "200"),
        check={"frechet.distance": 10.12, "precision_recall.precision": 0.91,
               "precision_recall.recall": 0.91}),
    ZooModel(
        name="flow-fashion-mnist",
        sha256="5986af377667c92ac9bae4b55a6a7e7011ac7115cde74ab4bae66f26a2997ac3",
        data="fashion-mnist, 8-bit, uniformly dequantised: trained on train[:90%], validated on "
             "train[90%:]",
        recipe="dgm train flow --config recipes/flow-fashion-mnist.yaml --precision bf16 (the "
               "default conv RealNVP, cosine, EMA 0.999, 40 epochs; 1 h 42 min on the 2 cores "
               "of an Intel Xeon with AMX, 313 GFLOP/s fp32 sgemm, shared with other jobs for "
               "40 min), then dgm evaluate RUN --dequant-samples 16 --sample-quality (in fp32)",
        results="test 2.980 +- 0.009 bits/dim (1619.4 +- 4.6 nats, one dequantisation draw); "
                "2.957 importance-weighted over 16 draws; in dgm-fashion-mnist-cnn-v1: Frechet "
                "20.36 (floor 0.13), precision 0.745 (floor 0.895), recall 0.858 (floor 0.897)",
        check_args=("--split", "test[:200]", "--dequant-samples", "4"),
        check={"log_px.bits_per_dim": 2.894, "log_px_iw.bits_per_dim": 2.882}),
    ZooModel(
        name="diffusion-fashion-mnist",
        sha256="1ec4050824c9b1ca4f2d7c08a1768b6a37e4d3fb79c2780d991f4956484a52fa",
        data="fashion-mnist, 8-bit, scaled to [-1, 1]: trained on train[:90%], validated on "
             "train[90%:]",
        recipe="dgm train diffusion --config recipes/diffusion-fashion-mnist.yaml (U-Net of "
               "32 channels, multipliers 1, 2, 2; the simple loss on the cosine schedule, v "
               "prediction, EMA 0.999, 12 epochs in bf16; 56 min on the 2 cores of an Intel "
               "Xeon with AMX, 314 GFLOP/s fp32 sgemm), then dgm evaluate RUN --time-samples 8 "
               "--sample-quality --precision bf16 (the bound in fp32, the samples in bf16)",
        results="test bound 3.369 +- 0.010 bits/dim (1830.6 +- 5.5 nats; prior 1.78, diffusion "
                "1824.62, reconstruction 4.24); 10000 samples in 50 DDIM steps at eta 0.5, rho "
                "3 in dgm-fashion-mnist-cnn-v1: Frechet 18.25 (floor 0.13), precision 0.855 "
                "(floor 0.895), recall 0.851 (floor 0.897)",
        check_args=("--split", "test[:200]", "--time-samples", "2"),
        check={"nll_bound.bits_per_dim": 3.149, "terms.prior_nats": 1.792,
               "terms.reconstruction_nats": 4.233}),
)}


def zoo_file(name: str) -> Path:
    """The hash-checked file of a zoo model."""
    if name not in ZOO:
        known = ", ".join(f"zoo:{n}" for n in ZOO) or "none yet"
        raise DgmError(f"no zoo model {name!r}; dgm ships: {known} (dgm zoo lists them)")
    model = ZOO[name]
    path = ZOO_DIR / f"{name}.safetensors"
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise DgmError(f"zoo model {name} is missing from this installation ({e.strerror}); "
                       "reinstall dgm") from None
    if digest != model.sha256:
        raise DgmError(f"zoo model {name} ({path}) has SHA-256 {digest[:16]}..., not the "
                       f"{model.sha256[:16]}... it was published with; reinstall dgm")
    return path


def is_packed(source: str | Path) -> bool:
    """Whether ``source`` names a packed run (zoo:NAME or a file) rather than a folder."""
    return str(source).startswith("zoo:") or Path(source).is_file()


@contextlib.contextmanager
def open_run(source: str | Path) -> Iterator[Path]:
    """The run folder that ``source`` names: a folder as it is; a packed run (zoo:NAME or a
    file that ``dgm export`` wrote) laid out in a temporary folder for the block's length."""
    if not is_packed(source):
        yield Path(source)
        return
    path = zoo_file(str(source)[4:]) if str(source).startswith("zoo:") else Path(source)
    with tempfile.TemporaryDirectory(prefix="dgm-packed-") as folder:
        unpack_run(path, Path(folder))
        yield Path(folder)

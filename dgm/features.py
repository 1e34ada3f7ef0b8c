"""The feature networks that sample-quality scores are measured in.

A score means the same on every machine only if it is measured in the same features.
For each built-in data set a small CNN classifier ships with dgm (``dgm/weights/``), made
by ``scripts/make_feature_nets.py``: seeded and on one thread, so that the script makes
the same bytes again on the same CPU and torch. Its SHA-256 is recorded here and checked
on every load, and every score is printed with the network's name and hash, the way a
paper cites "Inception-v3, pool3" (Inception does not know 28x28 grey images, and its
weights cannot be downloaded here anyway).

Your own data sets get a network of the same shape trained on their training split and
cached on disk; its hash is printed too, but its scores compare only with scores
measured with that same file.

A weights file is the network's float32 tensors, little-endian, in ``state_dict``
order: no pickle, and nothing in it (a time stamp, a library version) that would change
the bytes between two runs of the script.
"""

import hashlib
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dgm.data import default_cache_dir
from dgm.errors import DgmError
from dgm.runs import atomic_write

__all__ = ["SHIPPED", "WEIGHTS_DIR", "FeatureNet", "Recipe", "Shipped", "accuracy",
           "extract_features", "load_weights", "local_feature_net",
           "shipped_feature_net", "train_feature_net", "weights_bytes"]

WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class Recipe:
    """How a feature network is trained (the shipped ones and the cached ones alike)."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0


@dataclass(frozen=True)
class Shipped:
    """A feature network that ships with dgm, and what its script recorded."""

    name: str
    train_split: str
    test_split: str  # where test_accuracy was measured
    test_accuracy: float
    sha256: str

    @property
    def file(self) -> Path:
        return WEIGHTS_DIR / f"{self.name}.bin"


# Made by scripts/make_feature_nets.py with Recipe() (torch 2.13.0, 2 CPU cores, 2026-11-26).
# MNIST's training split is not on the machine that made it, so its network learnt from
# the first half of the test split and its accuracy is measured on the second half.
SHIPPED = {
    "fashion-mnist": Shipped(
        "dgm-fashion-mnist-cnn-v1", "train", "test", 0.8933,
        "55f59e8730177dad7387337abb69743ec5778861873abf504d5c353a8e5cd75a"),
    "mnist": Shipped(
        "dgm-mnist-cnn-v1", "test[:5000]", "test[5000:]", 0.9540,
        "7e1da69a86a6f1a9833dc817f9e2fa8a83bc9f785184012ac2ea74f80d744d96"),
}


class FeatureNet(nn.Module):
    """A small CNN classifier: (B, C, H, W) images in [0, 1] -> class logits (B, K).

    Scores use ``features``, its penultimate activations (B, 64). About 61,000
    parameters: 240 KB of weights.
    """

    num_features = 64  # torchmetrics reads this rather than running a dummy image

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(3),  # any size
            nn.Flatten(), nn.Linear(64 * 9, self.num_features), nn.ReLU())
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _to_unit(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 images -> [0, 1]; float images (already in [0, 1]) only change dtype."""
    return x.to(dtype) / 255 if x.dtype == torch.uint8 else x.to(dtype)


def train_feature_net(x: torch.Tensor, labels: torch.Tensor, recipe: Recipe = Recipe(),
                      quiet: bool = True) -> FeatureNet:
    """Train a :class:`FeatureNet` on images (N, C, H, W) (uint8 or [0, 1]) and labels (N,).

    Seeded by ``recipe.seed`` without touching the global random state: the same data,
    recipe, thread count and machine give the same weights, bit for bit.
    """
    gen = torch.Generator(x.device).manual_seed(recipe.seed)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(recipe.seed)
        net = FeatureNet(int(labels.max()) + 1, x.shape[1]).to(x.device)
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    net.train()
    n_batches = max(1, len(x) // recipe.batch_size)
    with torch.enable_grad():  # callers may be under no_grad
        for epoch in range(recipe.epochs):
            perm = torch.randperm(len(x), generator=gen, device=x.device)
            for i in tqdm(range(n_batches), desc=f"feature network, epoch {epoch + 1}",
                          leave=False, disable=quiet or None):
                idx = perm[i * recipe.batch_size:(i + 1) * recipe.batch_size]
                loss = F.cross_entropy(net(_to_unit(x[idx], torch.float32)), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return net.eval()


def weights_bytes(net: FeatureNet) -> bytes:
    """The weights file's contents: every tensor as little-endian float32, in order."""
    return b"".join(t.detach().cpu().float().numpy().astype("<f4").tobytes()
                    for t in net.state_dict().values())


def load_weights(path: Path, sha256: str | None, num_classes: int = 10,
                 in_channels: int = 1) -> tuple[FeatureNet, str]:
    """A :class:`FeatureNet` from a weights file and the file's SHA-256, refused unless that
    is ``sha256`` (``None``: any hash, for the cache). The network computes in float64, so
    that rounding differences between CPUs stay far below the printed digits."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DgmError(f"cannot read feature weights {path}: {e.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise DgmError(f"feature weights {path} have SHA-256 {digest[:16]}..., not the recorded "
                       f"{sha256[:16]}...: the file was changed; reinstall dgm or re-run "
                       "scripts/make_feature_nets.py")
    net = FeatureNet(num_classes, in_channels)
    state = net.state_dict()
    sizes = [t.numel() for t in state.values()]
    if len(data) != 4 * sum(sizes):
        raise DgmError(f"feature weights {path} hold {len(data)} bytes, not the "
                       f"{4 * sum(sizes)} of this network")
    flat = torch.from_numpy(np.frombuffer(data, dtype="<f4").astype(np.float32))
    net.load_state_dict({k: chunk.view_as(t) for (k, t), chunk
                         in zip(state.items(), flat.split(sizes), strict=True)})
    return net.double().eval(), digest


def shipped_feature_net(dataset: str) -> tuple[FeatureNet, dict]:
    """The network that ships for a built-in data set, hash-checked, and its description."""
    spec = SHIPPED[dataset]
    net, _ = load_weights(spec.file, spec.sha256)
    return net, {"name": spec.name, "sha256": spec.sha256, "source": "shipped with dgm",
                 "train_split": spec.train_split,
                 "recorded_accuracy": {spec.test_split: spec.test_accuracy}}


def local_feature_net(dataset: str, x: torch.Tensor, labels: torch.Tensor,
                      recipe: Recipe = Recipe(), cache_dir: str | Path | None = None,
                      quiet: bool = True) -> tuple[FeatureNet, dict]:
    """A network trained on this data set's images and labels: from the cache, else trained
    and cached as ``<cache>/features/<data set>-<hash of data and recipe>.bin`` under
    ``$XDG_CACHE_HOME/dgm`` or ``~/.cache/dgm``."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir() / "features"
    h = hashlib.sha256()
    for t in (x, labels):
        h.update(t.cpu().contiguous().numpy().tobytes())
    h.update(repr(asdict(recipe)).encode())
    # A data set may be a path ("data/faces.npz"): its last part names the file; the hash of
    # the data keeps two of the same name apart.
    stem = re.sub(r"[^\w.-]", "_", Path(dataset).name) or "data"
    name = f"local-{stem}-{h.hexdigest()[:12]}"
    path = folder / f"{name}.bin"
    num_classes = int(labels.max()) + 1
    try:
        net, digest = load_weights(path, None, num_classes, x.shape[1])
    except DgmError:  # not cached yet, or a broken cache file: train and replace it
        data = weights_bytes(train_feature_net(x, labels, recipe, quiet))
        atomic_write(path, lambda f: f.write(data))
        net, digest = load_weights(path, None, num_classes, x.shape[1])
    return net.to(x.device), {
        "name": name, "sha256": digest, "file": str(path),
        "source": "trained on this machine from the run's training split: compare only "
                  "with scores made with this same file"}


@torch.no_grad()
def extract_features(net: FeatureNet, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Penultimate features of images (N, C, H, W) (uint8 or [0, 1]) -> (N, 64) in the
    network's dtype."""
    dtype = next(net.parameters()).dtype
    return torch.cat([net.features(_to_unit(x[i:i + batch_size], dtype))
                      for i in range(0, len(x), batch_size)])


@torch.no_grad()
def accuracy(net: FeatureNet, x: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 1000) -> float:
    """Fraction of images (uint8 or [0, 1]) that ``net`` classifies correctly."""
    dtype = next(net.parameters()).dtype
    correct = sum((net(_to_unit(x[i:i + batch_size], dtype)).argmax(1)
                   == labels[i:i + batch_size]).sum().item() for i in range(0, len(x), batch_size))
    return correct / len(x)

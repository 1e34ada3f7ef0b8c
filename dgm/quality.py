"""Sample quality for any model that samples images: Frechet and kernel distances,
precision and recall, and Parzen windows.

The Frechet distance is the FID idea (Heusel et al., 2017) with a small CNN that dgm
trains on the data set itself in place of Inception (whose weights cannot be downloaded
here, and which does not know 28x28 greyscale digits or clothes anyway). The classifier
is trained once per data set and training split, seeded, and cached on disk, so every
model (VAE, GAN, flow) is scored in the same feature space. Numbers are comparable only
between runs scored with the same classifier (same data set, training split and recipe);
they are not comparable with published FIDs.

The Parzen-window log-likelihood (Breuleux et al., 2011; as reported by Goodfellow et al.,
2014) is here for comparison with the literature only; see ``PARZEN_NOTE``.
"""

import dataclasses
import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dgm.data import default_cache_dir
from dgm.maths import bits_per_dim
from dgm.runs import atomic_write

__all__ = ["PARZEN_NOTE", "ClassifierRecipe", "FeatureNet", "cached_classifier",
           "classifier_accuracy", "extract_features", "frechet_distance", "kernel_distance",
           "parzen_log_prob", "precision_recall",
           "parzen_log_likelihood", "sample_quality", "train_classifier"]

PARZEN_NOTE = (
    "Parzen-window estimates are a weak measure (Theis et al., 2016): in 784 dimensions they "
    "need far more samples than 10k to approach the true log-likelihood, they reward blurry "
    "or memorised samples, and a k-means of the training set can beat real models. Use them "
    "only to compare with old papers (Goodfellow et al. 2014: 225 nats on MNIST); the "
    "density is on pixels in [0, 1], bits_per_dim on the 0..255 scale (+log2 255 ~ 8 bits).")


@dataclass(frozen=True)
class ClassifierRecipe:
    """How the feature classifier is built and trained; part of its cache key."""

    channels: tuple[int, int] = (16, 32)
    feature_dim: int = 128
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0


class FeatureNet(nn.Module):
    """A small CNN classifier: (B, C, H, W) images in [0, 1] -> class logits (B, K).

    ``features`` gives its penultimate activations (B, feature_dim), the space in which
    the Frechet distance is measured.
    """

    def __init__(self, num_classes: int = 10, channels: tuple[int, int] = (16, 32),
                 feature_dim: int = 128, in_channels: int = 1,
                 image_size: int | tuple[int, int] = 28):
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        c1, c2 = channels
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # (B, c1, H/2, W/2)
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # (B, c2, H/4, W/4)
            nn.Flatten(), nn.Linear(c2 * (h // 4) * (w // 4), feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> floats in [0, 1]; float images pass unchanged."""
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def train_classifier(x: torch.Tensor, labels: torch.Tensor,
                     recipe: ClassifierRecipe = ClassifierRecipe(),
                     quiet: bool = True) -> FeatureNet:
    """Train a :class:`FeatureNet` on images (N, 1, H, W) (uint8 or [0, 1]) and labels (N,).

    Seeded by ``recipe.seed`` without touching the global random state, so the same data
    and recipe give the same network.
    """
    gen = torch.Generator(x.device).manual_seed(recipe.seed)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(recipe.seed)
        net = FeatureNet(int(labels.max()) + 1, recipe.channels, recipe.feature_dim,
                         x.shape[1], tuple(x.shape[2:])).to(x.device)
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr)
    net.train()
    n_batches = max(1, len(x) // recipe.batch_size)
    with torch.enable_grad():  # callers may evaluate under no_grad
        _fit(net, opt, x, labels, recipe, gen, n_batches, quiet)
    return net.eval()


def _fit(net, opt, x, labels, recipe, gen, n_batches, quiet) -> None:
    for epoch in range(recipe.epochs):
        perm = torch.randperm(len(x), generator=gen, device=x.device)
        for i in tqdm(range(n_batches), desc=f"feature classifier, epoch {epoch + 1}",
                      leave=False, disable=quiet or None):
            idx = perm[i * recipe.batch_size:(i + 1) * recipe.batch_size]
            loss = F.cross_entropy(net(_to_unit(x[idx])), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def _cache_key(x: torch.Tensor, labels: torch.Tensor, recipe: ClassifierRecipe) -> str:
    h = hashlib.sha256()
    h.update(x.cpu().contiguous().numpy().tobytes())
    h.update(labels.cpu().contiguous().numpy().tobytes())
    h.update(repr((FeatureNet.__qualname__, dataclasses.asdict(recipe))).encode())
    return h.hexdigest()[:16]


def cached_classifier(dataset: str, x: torch.Tensor, labels: torch.Tensor,
                      recipe: ClassifierRecipe = ClassifierRecipe(),
                      cache_dir: str | Path | None = None,
                      quiet: bool = True) -> tuple[FeatureNet, Path, bool]:
    """The classifier for this training data and recipe: from the cache, else trained and cached.

    The cache file is ``<cache>/classifiers/<dataset>-<hash of data and recipe>.pt`` under
    the user's cache (``$XDG_CACHE_HOME/dgm`` or ``~/.cache/dgm``). Returns
    ``(network in eval mode, cache path, whether it was trained now)``.
    """
    folder = Path(cache_dir) if cache_dir else default_cache_dir() / "classifiers"
    # A data set may be a path ("data/faces.npz"): its last part names the file; the hash of
    # the data keeps two of the same name apart.
    name = re.sub(r"[^\w.-]", "_", Path(dataset).name) or "data"
    path = folder / f"{name}-{_cache_key(x, labels, recipe)}.pt"
    num_classes = int(labels.max()) + 1
    net = FeatureNet(num_classes, recipe.channels, recipe.feature_dim, x.shape[1],
                     tuple(x.shape[2:]))
    if path.is_file():
        try:
            payload = torch.load(path, map_location=x.device, weights_only=True)
            net.load_state_dict(payload["state_dict"])
            return net.to(x.device).eval(), path, False
        except Exception:  # a corrupt or foreign cache file is retrained and replaced
            pass
    net = train_classifier(x, labels, recipe, quiet)
    payload = {"dataset": dataset, "recipe": dataclasses.asdict(recipe),
               "state_dict": {k: v.cpu() for k, v in net.state_dict().items()}}
    atomic_write(path, lambda f: torch.save(payload, f))
    return net, path, True


@torch.no_grad()
def classifier_accuracy(net: FeatureNet, x: torch.Tensor, labels: torch.Tensor,
                        batch_size: int = 1000) -> float:
    """Fraction of images (uint8 or [0, 1]) that ``net`` classifies correctly."""
    correct = sum((net(_to_unit(x[i:i + batch_size])).argmax(1) == labels[i:i + batch_size])
                  .sum().item() for i in range(0, len(x), batch_size))
    return correct / len(x)


@torch.no_grad()
def extract_features(net: FeatureNet, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Penultimate features of images (N, C, H, W) (uint8 or [0, 1]): -> float64 (N, F)."""
    return torch.cat([net.features(_to_unit(x[i:i + batch_size])).double()
                      for i in range(0, len(x), batch_size)])


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, F) and (M, F).

    ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)), in float64. The trace
    of the square root is sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2))): that matrix is symmetric
    positive semi-definite with the same eigenvalues as S_a S_b, so symmetric
    eigendecompositions suffice (no scipy, no complex parts to discard).
    """
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    evals, evecs = torch.linalg.eigh(cov_a)
    sqrt_a = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    middle = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * tr_sqrt
    return max(fd.item(), 0.0)  # rounding can leave a tiny negative for identical sets


def kernel_distance(a: torch.Tensor, b: torch.Tensor, subsets: int = 100,
                    subset_size: int = 1000, generator: torch.Generator | None = None
                    ) -> tuple[float, float]:
    """Kernel distance (KID; Binkowski et al., 2018) between feature sets (N, F) and (M, F).

    The unbiased estimate of the squared MMD with the polynomial kernel
    k(x, y) = (x.y / F + 1)^3 on ``subsets`` random subsets of ``subset_size`` from each
    set; returns its mean and standard deviation over the subsets. Unlike the Frechet
    distance it has no bias at small sample sizes: two samples of one distribution score
    about 0, sometimes below.
    """
    a, b = a.double(), b.double()
    f, m = a.shape[1], min(subset_size, len(a), len(b))
    values = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=generator, device=a.device)[:m]]
        y = b[torch.randperm(len(b), generator=generator, device=b.device)[:m]]
        kxx, kyy, kxy = ((p @ q.T / f + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
        within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum())
        values.append(within / (m * (m - 1)) - 2 * kxy.mean())
    values = torch.stack(values)
    return values.mean().item(), (values.std().item() if subsets > 1 else math.nan)


def _kth_neighbour_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row: (N, F) -> (N,)."""
    radii = [torch.cdist(chunk, x).kthvalue(k + 1, dim=1).values  # +1: itself, at 0
             for chunk in x.split(1000)]
    return torch.cat(radii)


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Whether each point lies in a ball of the manifold: (N, F) -> (N,) bool."""
    return torch.cat([(torch.cdist(chunk, centres) <= radii).any(1)
                      for chunk in points.split(1000)])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict:
    """Improved precision and recall (Kynkaanniemi et al., 2019) of (M, F) generated
    features against (N, F) real ones.

    Each set's manifold is the union of balls around its points, each reaching to the
    point's k-th nearest neighbour in the set. Precision is the share of generated
    points inside the real manifold (fidelity), recall the share of real points inside
    the generated one (diversity: a sampler that drops a class loses recall, not
    precision).
    """
    real, fake = real.double(), fake.double()
    precision = _inside(fake, real, _kth_neighbour_radii(real, k)).double().mean().item()
    recall = _inside(real, fake, _kth_neighbour_radii(fake, k)).double().mean().item()
    return {"precision": precision, "recall": recall, "k": k}


def _sq_distances(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (N, K) between flattened rows of x and centres."""
    x, centres = x.flatten(1).float(), centres.flatten(1).float()
    d = x.square().sum(1, keepdim=True) + centres.square().sum(1) - 2 * x @ centres.T
    return d.clamp_min(0).double()


@torch.no_grad()
def parzen_log_prob(x: torch.Tensor, centres: torch.Tensor, sigmas: torch.Tensor,
                    batch_size: int = 500) -> torch.Tensor:
    """log of an isotropic Gaussian Parzen window with K centres, for each sigma: -> (S, N).

    log p(x) = logsumexp_k(-||x - c_k||^2 / (2 sigma^2)) - log K - D/2 log(2 pi sigma^2),
    with x (N, D...) and centres (K, D...) on the same scale; sigmas (S,).
    """
    sig = sigmas.double().to(x.device)[:, None, None]  # (S, 1, 1)
    dims = x[0].numel()
    out = []
    for i in range(0, len(x), batch_size):
        d = _sq_distances(x[i:i + batch_size], centres)  # (n, K)
        out.append(torch.logsumexp(-d / (2 * sig.square()), dim=-1))  # (S, n)
    log_norm = math.log(len(centres)) + 0.5 * dims * torch.log(2 * math.pi * sig[:, :, 0].square())
    return torch.cat(out, dim=1) - log_norm


def parzen_log_likelihood(samples: torch.Tensor, val: torch.Tensor, test: torch.Tensor,
                          sigmas: torch.Tensor | None = None) -> dict:
    """Goodfellow et al. (2014)'s protocol: sigma maximising the mean validation
    log-likelihood, then the test log-likelihood at that sigma; all images in [0, 1]."""
    sigmas = torch.logspace(-2, 0, 31, dtype=torch.float64) if sigmas is None else sigmas
    val_ll = parzen_log_prob(val, samples, sigmas).mean(1)
    best = int(val_ll.argmax())
    sigma = sigmas[best:best + 1]
    test_ll = parzen_log_prob(test, samples, sigma)[0]
    dims = test[0].numel()
    mean = test_ll.mean().item()
    return {"log_px_nats": mean,
            "sem_nats": (test_ll.std() / math.sqrt(len(test_ll))).item(),
            # The density is on [0, 1]-scaled pixels; on the 0..255 scale it is 255^-D
            # smaller (D log 255 nats more), which makes it comparable with flows' numbers.
            "bits_per_dim": bits_per_dim(-mean + dims * math.log(255), dims),
            "sigma": sigma.item(),
            "sigma_at_grid_edge": best in (0, len(sigmas) - 1),
            "n_samples": len(samples), "n_val": len(val),
            "note": PARZEN_NOTE}


@torch.no_grad()
def sample_quality(sample: Callable[[int, torch.Generator], torch.Tensor], dataset: str,
                   test: tuple[torch.Tensor, torch.Tensor],
                   train: tuple[torch.Tensor, torch.Tensor], val: torch.Tensor,
                   n_samples: int = 10000, seed: int = 1234, n_parzen_val: int = 1000,
                   recipe: ClassifierRecipe = ClassifierRecipe(),
                   cache_dir: str | Path | None = None, quiet: bool = True) -> dict:
    """Frechet and kernel distances, precision and recall, the feature classifier's accuracy
    and the Parzen log-likelihood of a sampler, each score beside its real-vs-real floor.

    ``sample(n, generator)`` returns n images (n, C, H, W) in [0, 1]; ``test`` and
    ``train`` are (uint8 images, labels) on the device to use, ``val`` uint8 images for
    choosing the Parzen bandwidth. ``frechet.real_reference`` is the distance between the
    test images and as many training images: what a perfect sampler would score, given
    the finite sample sizes.
    """
    test_x, test_y = test
    train_x, train_y = train
    net, path, trained = cached_classifier(dataset, train_x, train_y, recipe, cache_dir, quiet)
    gen = torch.Generator(test_x.device).manual_seed(seed)
    fakes = torch.cat([sample(min(1000, n_samples - i), gen).float().clamp(0, 1)
                       for i in range(0, n_samples, 1000)])
    f_test = extract_features(net, test_x)
    ref_idx = torch.randperm(len(train_x), generator=gen, device=train_x.device)[:len(test_x)]
    # The real reference: as many training images as test images, what a perfect sampler
    # would score given the finite sample sizes.
    f_fake, f_ref = extract_features(net, fakes), extract_features(net, train_x[ref_idx])
    quality = {
        "frechet": {"distance": frechet_distance(f_test, f_fake),
                    "real_reference": frechet_distance(f_test, f_ref),
                    "n_generated": n_samples, "n_test": len(test_x),
                    "feature_dim": recipe.feature_dim},
        "classifier": {"test_accuracy": classifier_accuracy(net, test_x, test_y),
                       "n_train": len(train_x), "epochs": recipe.epochs,
                       "cache": str(path), "trained_now": trained},
    }
    kid, kid_std = kernel_distance(f_test, f_fake, generator=gen)
    kid_ref, kid_ref_std = kernel_distance(f_test, f_ref, generator=gen)
    quality["kid"] = {"mean": kid, "std": kid_std, "real_reference": kid_ref,
                      "real_reference_std": kid_ref_std, "subsets": 100, "subset_size": 1000}
    quality["precision_recall"] = {
        **precision_recall(f_test, f_fake),
        "real_reference": {k: v for k, v in precision_recall(f_test, f_ref).items()
                           if k != "k"}}
    quality["parzen"] = parzen_log_likelihood(fakes, _to_unit(val[:n_parzen_val]),
                                              _to_unit(test_x))
    return quality

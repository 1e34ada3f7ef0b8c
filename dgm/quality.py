"""Sample quality for any model that samples images: Frechet and kernel distances,
precision and recall, and Parzen windows.

The scores are measured in the features of :mod:`dgm.features`: for a built-in data set
a small classifier that ships with dgm, hash-checked on every load, so the same run and
seed give the same numbers on every machine. They are the FID and KID ideas (Heusel et
al., 2017; Binkowski et al., 2018) in these features, not in Inception's, so they are
not comparable with published FIDs; each comes beside its real-against-real floor on
the same number of images.

The Parzen-window log-likelihood (Breuleux et al., 2011; as reported by Goodfellow et al.,
2014) is here for comparison with the literature only; see ``PARZEN_NOTE``.
"""

import math
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from dgm.features import FeatureNet, accuracy, extract_features
from dgm.maths import bits_per_dim

__all__ = ["PARZEN_NOTE", "frechet_distance", "inside_manifold", "kernel_distance",
           "kth_neighbour_radii", "parzen_log_likelihood", "parzen_log_prob", "precision_recall",
           "sample_quality"]

PARZEN_NOTE = (
    "Parzen-window estimates are a weak measure (Theis et al., 2016): in 784 dimensions they "
    "need far more samples than 10k to approach the true log-likelihood, they reward blurry "
    "or memorised samples, and a k-means of the training set can beat real models. Use them "
    "only to compare with old papers (Goodfellow et al. 2014: 225 nats on MNIST); the "
    "density is on pixels in [0, 1], bits_per_dim on the 0..255 scale (+log2 255 ~ 8 bits).")


class _Given(nn.Module):
    """Features computed already: torchmetrics' metrics take a feature module."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, F) and (M, F):
    ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)), by torchmetrics in
    float64."""
    fid = FrechetInceptionDistance(feature=_Given(a.shape[1]), sync_on_compute=False)
    fid.update(a.double(), real=True)
    fid.update(b.double(), real=False)
    return max(fid.compute().item(), 0.0)  # rounding can leave a tiny negative for equal sets


def kernel_distance(a: torch.Tensor, b: torch.Tensor, subsets: int = 100,
                    subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel distance (KID; Binkowski et al., 2018) between feature sets (N, F) and (M, F),
    by torchmetrics: the unbiased estimate of the squared MMD with the polynomial kernel
    k(x, y) = (x.y / F + 1)^3 on ``subsets`` random subsets of ``subset_size`` (at most the
    smaller set) from each set; returns its mean and standard deviation over the subsets.
    Unlike the Frechet distance it has no bias at small sample sizes: two samples of one
    distribution score about 0, sometimes below."""
    m = min(subset_size, len(a), len(b))
    with warnings.catch_warnings():  # "will save all extracted features": they are given
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Given(a.shape[1]), subsets=subsets,
                                      subset_size=m, sync_on_compute=False)
    kid.update(a.double(), real=True)
    kid.update(b.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # its subsets come from the global generator
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return mean.item(), std.item()


def kth_neighbour_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row: (N, F) -> (N,)."""
    radii = [torch.cdist(chunk, x).kthvalue(k + 1, dim=1).values  # +1: itself, at 0
             for chunk in x.split(1000)]
    return torch.cat(radii)


def inside_manifold(points: torch.Tensor, centres: torch.Tensor,
                    radii: torch.Tensor) -> torch.Tensor:
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
    precision = inside_manifold(fake, real, kth_neighbour_radii(real, k)).double().mean().item()
    recall = inside_manifold(real, fake, kth_neighbour_radii(fake, k)).double().mean().item()
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
            "sem_nats": (test_ll.std() / math.sqrt(len(test_ll))).item()
            if len(test_ll) > 1 else math.nan,
            # The density is on [0, 1]-scaled pixels; on the 0..255 scale it is 255^-D
            # smaller (D log 255 nats more), which makes it comparable with flows' numbers.
            "bits_per_dim": bits_per_dim(-mean + dims * math.log(255), dims),
            "sigma": sigma.item(),
            "sigma_at_grid_edge": best in (0, len(sigmas) - 1),
            "n_samples": len(samples), "n_val": len(val),
            "note": PARZEN_NOTE}


@torch.no_grad()
def draw_samples(sample: Callable[[int, torch.Generator], torch.Tensor], n: int,
                 generator: torch.Generator) -> torch.Tensor:
    """n images from ``sample(n, generator)`` in batches of 1000 (so that memory stays small
    and every caller draws the same images from the same seed): float32 in [0, 1]."""
    return torch.cat([sample(min(1000, n - i), generator).float().clamp(0, 1)
                      for i in range(0, n, 1000)])


@torch.no_grad()
def sample_quality(fakes: torch.Tensor, features: tuple[FeatureNet, dict],
                   test: tuple[torch.Tensor, torch.Tensor], train_x: torch.Tensor,
                   val: torch.Tensor, seed: int = 1234, n_parzen_val: int = 1000) -> dict:
    """Frechet and kernel distances, precision and recall of generated images, each beside
    its real-against-real floor and with the feature network's name and hash; the network's
    accuracy on the test images; the Parzen log-likelihood.

    ``fakes`` are images (N, C, H, W) in [0, 1] from any sampler (:func:`draw_samples` draws
    them from a model); ``features`` is a network and its description from
    :mod:`dgm.features`; ``test`` is (uint8 images, labels) on the device to use,
    ``train_x`` and ``val`` uint8 images. The floors score as many training images as there
    are generated ones (so a floor at 5000 samples is the floor at 5000: the distances'
    small-sample bias and the neighbourhoods of precision and recall depend on the count),
    drawn with ``seed`` alone (so they do not depend on the sampler): what a perfect sampler
    would score, given the finite sample sizes; ``val`` chooses the Parzen bandwidth.
    """
    test_x, test_y = test
    net, info = features
    net = net.to(test_x.device)
    fakes = fakes.to(test_x.device)
    n_samples = len(fakes)
    cite = f"{info['name']} sha256:{info['sha256'][:16]}"
    gen = torch.Generator(train_x.device).manual_seed(seed)
    ref_idx = torch.randperm(len(train_x), generator=gen, device=train_x.device)[:n_samples]
    f_test, f_fake = extract_features(net, test_x), extract_features(net, fakes)
    f_ref = extract_features(net, train_x[ref_idx])
    n_test, k = len(test_x), 3
    few = _too_few(n_test, n_samples, {"frechet": 2, "kid": 2, "precision_recall": k + 1})
    scores = {"features": {**info, "test_accuracy": accuracy(net, test_x, test_y)}}

    def score(name: str, keys: tuple[str, ...], compute: Callable[[], tuple], **about) -> dict:
        if name in few:  # the same keys, null, with the reason
            return dict.fromkeys(keys) | about | {"note": few[name]}
        return dict(zip(keys, compute(), strict=True)) | about

    def pr() -> tuple[float, ...]:
        fake, ref = precision_recall(f_test, f_fake, k), precision_recall(f_test, f_ref, k)
        return fake["precision"], fake["recall"], ref["precision"], ref["recall"]

    scores["frechet"] = score(
        "frechet", ("distance", "real_reference"),
        lambda: (frechet_distance(f_test, f_fake), frechet_distance(f_test, f_ref)),
        n_generated=n_samples, n_test=n_test, n_reference=len(ref_idx), features=cite)
    m = min(1000, n_test, n_samples, len(ref_idx))  # floor and score on subsets of one size
    scores["kid"] = score(
        "kid", ("mean", "std", "real_reference", "real_reference_std"),
        lambda: (*kernel_distance(f_test, f_fake, subset_size=m, seed=seed),
                 *kernel_distance(f_test, f_ref, subset_size=m, seed=seed)),
        subsets=100, subset_size=m, features=cite)
    scores["precision_recall"] = score(
        "precision_recall", ("precision", "recall", "real_precision", "real_recall"), pr,
        k=k, features=cite)
    scores["parzen"] = parzen_log_likelihood(fakes, val[:n_parzen_val].double() / 255,
                                             test_x.double() / 255)
    return scores


def _too_few(n_test: int, n_generated: int, least: dict[str, int]) -> dict[str, str]:
    """A note for each score that needs more images per set than there are: a covariance
    needs 2, the unbiased kernel distance 2 per subset, a k-th neighbour k + 1."""
    return {name: f"not computed: it needs at least {n} test and {n} generated images, "
                  f"got {n_test} and {n_generated}"
            for name, n in least.items() if min(n_test, n_generated) < n}

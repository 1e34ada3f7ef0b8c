"""Sample-quality scores: the Frechet distance's maths and sanity, Parzen windows, the cache."""

import math

import pytest
import torch

from dgm.data import load_split
from dgm.quality import (
    ClassifierRecipe,
    cached_classifier,
    classifier_accuracy,
    extract_features,
    frechet_distance,
    kernel_distance,
    parzen_log_likelihood,
    parzen_log_prob,
    precision_recall,
)

TINY = ClassifierRecipe(channels=(8, 16), feature_dim=32, epochs=8)


def gaussian(n: int, mean: torch.Tensor, cov_sqrt: torch.Tensor) -> torch.Tensor:
    return mean + torch.randn(n, len(mean), dtype=torch.float64) @ cov_sqrt.T


def test_frechet_matches_closed_form_for_diagonal_gaussians():
    # For diagonal covariances the distance is ||mu_a - mu_b||^2 + sum (s_a - s_b)^2, s the stds.
    s_a, s_b = torch.tensor([1.0, 2.0, 0.5]).double(), torch.tensor([2.0, 1.0, 0.5]).double()
    mu_b = torch.tensor([1.0, 0.0, -1.0]).double()
    a = gaussian(200_000, torch.zeros(3, dtype=torch.float64), torch.diag(s_a))
    b = gaussian(200_000, mu_b, torch.diag(s_b))
    expected = mu_b.square().sum() + (s_a - s_b).square().sum()
    assert frechet_distance(a, b) == pytest.approx(expected.item(), rel=0.02)


def test_frechet_handles_non_commuting_covariances():
    # tr((S_a S_b)^(1/2)) from the eigenvalues of S_a S_b computed another way.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5000, 6, generator=g, dtype=torch.float64) @ torch.randn(
        6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(5000, 6, generator=g, dtype=torch.float64) @ torch.randn(
        6, 6, generator=g, dtype=torch.float64) + 1
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    tr_sqrt = torch.linalg.eigvals(ca @ cb).real.clamp_min(0).sqrt().sum()
    expected = (a.mean(0) - b.mean(0)).square().sum() + ca.trace() + cb.trace() - 2 * tr_sqrt
    assert frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)


@pytest.fixture(scope="module")
def fashion(real_data_dir):
    train_x, train_y = load_split("fashion-mnist", "train[:1000]", real_data_dir)
    test_x, test_y = load_split("fashion-mnist", "test[:500]", real_data_dir)
    other_x, _ = load_split("fashion-mnist", "train[1000:1500]", real_data_dir)
    return train_x, train_y, test_x, test_y, other_x


def test_frechet_score_is_sane(fashion, tmp_path):
    train_x, train_y, test_x, test_y, other_x = fashion
    net, _, _ = cached_classifier("fashion-mnist", train_x, train_y, TINY, tmp_path)
    assert classifier_accuracy(net, test_x, test_y) > 0.5  # well above chance (0.1)
    ref = extract_features(net, test_x)
    real = frechet_distance(ref, extract_features(net, other_x))
    g = torch.Generator().manual_seed(0)
    noise = frechet_distance(ref, extract_features(net, torch.rand(500, 1, 28, 28, generator=g)))
    assert real < 0.05 * noise

    # A "generator" that gets better: fewer and fewer of its images are noise.
    x = other_x.float() / 255
    junk = torch.rand(x.shape, generator=g)
    scores = [frechet_distance(ref, extract_features(net, torch.cat([junk[:k], x[k:]])))
              for k in (250, 100, 25)]
    assert scores[0] > scores[1] > scores[2]  # 5% junk is within sampling noise of `real`


def test_classifier_cache_round_trip(fashion, tmp_path):
    train_x, train_y, test_x, _, _ = fashion
    recipe = ClassifierRecipe(channels=(4, 8), feature_dim=16, epochs=1)
    net, path, trained = cached_classifier("fashion-mnist", train_x, train_y, recipe, tmp_path)
    assert trained and path.is_file() and path.name.startswith("fashion-mnist-")
    again, path2, trained2 = cached_classifier("fashion-mnist", train_x, train_y, recipe,
                                               tmp_path)
    assert path2 == path and not trained2
    assert torch.equal(extract_features(net, test_x[:20]), extract_features(again, test_x[:20]))
    # Other training data, other file; a corrupt file is retrained, not an error.
    _, path3, _ = cached_classifier("fashion-mnist", train_x[:300], train_y[:300], recipe,
                                    tmp_path)
    assert path3 != path
    path.write_bytes(b"not a checkpoint")
    _, _, retrained = cached_classifier("fashion-mnist", train_x, train_y, recipe, tmp_path)
    assert retrained


def test_parzen_matches_direct_formula_and_ranks_samples(fashion):
    centres = torch.rand(5, 3, dtype=torch.float64)
    x = torch.rand(4, 3, dtype=torch.float64)
    sigma = 0.3
    direct = torch.stack([torch.distributions.Normal(c, sigma).log_prob(x).sum(-1)
                          for c in centres]).logsumexp(0) - math.log(5)
    got = parzen_log_prob(x, centres, torch.tensor([sigma]))[0]
    assert torch.allclose(got, direct, atol=1e-4)

    train_x, _, test_x, _, other_x = fashion
    real = parzen_log_likelihood(train_x / 255, other_x[:200] / 255, test_x / 255)
    noise = parzen_log_likelihood(torch.rand(1000, 1, 28, 28), other_x[:200] / 255, test_x / 255)
    assert real["log_px_nats"] > noise["log_px_nats"]
    assert not real["sigma_at_grid_edge"]
    assert "weak" in real["note"]


def _clusters(n: int, classes, gen, dim: int = 8) -> torch.Tensor:
    """n points around the centres of the given classes (10 fixed centres), (n, dim)."""
    centres = 6 * torch.randn(10, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=gen)]
    return centres[labels] + torch.randn(n, dim, generator=gen)


def test_kernel_distance_matches_the_formula_and_is_unbiased():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(5, 3, generator=gen, dtype=torch.float64) + 1
    # One subset holding all of the smaller set, against a direct double loop.
    kid, _ = kernel_distance(a[:5], b, subsets=1, subset_size=5)
    k = lambda x, y: (float(x @ y) / 3 + 1) ** 3  # noqa: E731
    xx = sum(k(a[i], a[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(b[i], b[j]) for i in range(5) for j in range(5) if i != j) / 20
    xy = sum(k(a[i], b[j]) for i in range(5) for j in range(5)) / 25
    assert kid == pytest.approx(xx + yy - 2 * xy, rel=1e-9)
    # Two samples of one distribution: about 0 within its spread; a shifted one: far above.
    real, other = torch.randn(2000, 8, generator=gen), torch.randn(2000, 8, generator=gen)
    same, same_std = kernel_distance(real, other, subsets=20, subset_size=500, generator=gen)
    assert abs(same) < 3 * same_std + 1e-3
    shifted, _ = kernel_distance(real, other + 0.5, subsets=20, subset_size=500, generator=gen)
    assert shifted > 10 * max(same_std, 1e-3)


def test_precision_and_recall_see_fidelity_and_diversity_apart():
    gen = torch.Generator().manual_seed(0)
    real = _clusters(2000, range(10), gen)
    # Finite samples leave real-vs-real below 1 (about 0.86 here, k = 3 as in the paper);
    # dgm reports that floor beside every score.
    same = precision_recall(real, _clusters(2000, range(10), gen))
    assert same["precision"] > 0.8 and same["recall"] > 0.8
    noise = precision_recall(real, 20 * torch.rand(2000, 8, generator=gen) - 10)
    assert noise["precision"] < 0.1
    dropped = precision_recall(real, _clusters(2000, range(9), gen))  # class 9 never drawn
    assert dropped["precision"] > 0.8 and dropped["recall"] < dropped["precision"] - 0.05

"""Sample-quality scores: the shipped feature networks, the distances' maths against
reference computations, precision and recall, Parzen windows."""

import hashlib
import math

import numpy as np
import pytest
import torch

import dgm.features
from dgm.cli import main
from dgm.data import load_split
from dgm.errors import DgmError
from dgm.features import (
    SHIPPED,
    Recipe,
    accuracy,
    extract_features,
    load_weights,
    local_feature_net,
    shipped_feature_net,
    train_feature_net,
    weights_bytes,
)
from dgm.quality import (
    draw_samples,
    frechet_distance,
    kernel_distance,
    parzen_log_likelihood,
    parzen_log_prob,
    precision_recall,
    sample_quality,
)


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


def _sqrtm(m: np.ndarray) -> np.ndarray:
    """Matrix square root by the Denman-Beavers iteration, in NumPy: SciPy's ``sqrtm``
    without SciPy (it converges for matrices with no eigenvalues <= 0, as S_a S_b has)."""
    y, z = m, np.eye(len(m))
    for _ in range(50):
        y, z = (y + np.linalg.inv(z)) / 2, (z + np.linalg.inv(y)) / 2
    return y


def _frechet_reference(a: np.ndarray, b: np.ndarray, sqrtm) -> float:
    """The FID papers' formula as written with SciPy: ||mu_a - mu_b||^2
    + tr(S_a + S_b - 2 sqrtm(S_a S_b))."""
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.real(sqrtm(ca @ cb))
    return float(np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb - 2 * covmean))


def _random_features(seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(3000, 6, generator=g, dtype=torch.float64) @ torch.randn(
        6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(3000, 6, generator=g, dtype=torch.float64) @ torch.randn(
        6, 6, generator=g, dtype=torch.float64) + 1
    return a, b


def test_frechet_matches_the_sqrtm_formula_on_non_commuting_covariances():
    a, b = _random_features(0)
    expected = _frechet_reference(a.numpy(), b.numpy(), _sqrtm)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-8)


def test_frechet_matches_scipy():
    from scipy import linalg  # a test dependency: an independent sqrtm, never skipped
    a, b = _random_features(1)
    expected = _frechet_reference(a.numpy(), b.numpy(), linalg.sqrtm)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


@pytest.fixture(scope="module")
def fashion(real_data_dir):
    train_x, train_y = load_split("fashion-mnist", "train[:1000]", real_data_dir)
    test_x, test_y = load_split("fashion-mnist", "test[:500]", real_data_dir)
    other_x, _ = load_split("fashion-mnist", "train[1000:1500]", real_data_dir)
    return train_x, train_y, test_x, test_y, other_x


@pytest.mark.parametrize("dataset", list(SHIPPED))
def test_shipped_feature_nets_load_and_give_their_recorded_accuracy(dataset, real_data_dir):
    spec = SHIPPED[dataset]
    data = spec.file.read_bytes()
    assert len(data) < 400_000 and hashlib.sha256(data).hexdigest() == spec.sha256
    net, info = shipped_feature_net(dataset)
    assert info["name"] == spec.name and info["sha256"] == spec.sha256
    x, y = load_split(dataset, spec.test_split, real_data_dir)
    assert round(accuracy(net, x, y), 4) == round(spec.test_accuracy, 4)
    assert spec.test_accuracy > 0.85


def test_a_tampered_weights_file_is_refused_in_one_line(fake_data_dir, tmp_path, monkeypatch,
                                                        capsys):
    spec = SHIPPED["mnist"]
    tampered = bytearray(spec.file.read_bytes())
    tampered[1000] ^= 1  # one bit of one weight
    (tmp_path / spec.file.name).write_bytes(bytes(tampered))
    with pytest.raises(DgmError, match="SHA-256"):
        load_weights(tmp_path / spec.file.name, spec.sha256)

    run = tmp_path / "run"
    assert main(["train", "vae", "--dataset", "mnist", "--data-dir", str(fake_data_dir),
                 "--offline", "--train-split", "train[:64]", "--val-split", "test[:32]",
                 "--test-split", "test[32:]", "--epochs", "1", "--hidden-dim", "16",
                 "--batch-size", "32", "--quiet", "--out", str(run)]) == 0
    monkeypatch.setattr(dgm.features, "WEIGHTS_DIR", tmp_path)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--iw-samples", "2", "--sample-quality"]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "SHA-256" in err and "reinstall" in err
    assert not (run / "evaluation.json").exists()  # refused before any work


def test_the_feature_net_recipe_is_deterministic_and_the_file_round_trips(fashion, tmp_path):
    train_x, train_y, test_x, _, _ = fashion
    recipe = Recipe(epochs=1)
    first = weights_bytes(train_feature_net(train_x[:512], train_y[:512], recipe))
    second = weights_bytes(train_feature_net(train_x[:512], train_y[:512], recipe))
    assert first == second
    assert first != weights_bytes(train_feature_net(train_x[:512], train_y[:512],
                                                    Recipe(epochs=1, seed=1)))
    (tmp_path / "w.bin").write_bytes(first)
    net, digest = load_weights(tmp_path / "w.bin", hashlib.sha256(first).hexdigest())
    assert weights_bytes(net) == first
    with pytest.raises(DgmError, match="bytes"):  # the right hash of a wrong-sized file
        (tmp_path / "short.bin").write_bytes(first[:-4])
        load_weights(tmp_path / "short.bin", None)


def test_local_feature_net_cache_round_trip(fashion, tmp_path):
    train_x, train_y, test_x, _, _ = fashion
    recipe = Recipe(epochs=1)
    net, info = local_feature_net("my/data.npz", train_x, train_y, recipe, tmp_path)
    path = tmp_path / f"{info['name']}.bin"
    assert info["name"].startswith("local-data.npz-") and path.is_file()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"]
    again, info2 = local_feature_net("my/data.npz", train_x, train_y, recipe, tmp_path)
    assert info2 == info
    assert torch.equal(extract_features(net, test_x[:20]), extract_features(again, test_x[:20]))
    # Other training data, other file; a broken file is retrained, not an error.
    _, info3 = local_feature_net("my/data.npz", train_x[:300], train_y[:300], recipe, tmp_path)
    assert info3["name"] != info["name"]
    path.write_bytes(b"not weights")
    _, info4 = local_feature_net("my/data.npz", train_x, train_y, recipe, tmp_path)
    assert info4 == info


def test_scores_in_the_shipped_features_rank_samplers(fashion):
    _, _, test_x, _, other_x = fashion
    net, _ = shipped_feature_net("fashion-mnist")
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
    assert scores[0] > scores[1] > scores[2]


def test_precision_and_recall_in_the_shipped_features(real_data_dir):
    net, _ = shipped_feature_net("fashion-mnist")
    test_x, _ = load_split("fashion-mnist", "test[:2000]", real_data_dir)
    train_x, train_y = load_split("fashion-mnist", "train[:3000]", real_data_dir)
    real = extract_features(net, test_x)
    same = precision_recall(real, extract_features(net, train_x[:2000]))
    assert same["precision"] > 0.7 and same["recall"] > 0.7
    noise = torch.rand(2000, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert precision_recall(real, extract_features(net, noise))["precision"] < 0.05
    no_trousers = train_x[train_y != 1][:2000]  # one class never generated
    dropped = precision_recall(real, extract_features(net, no_trousers))
    assert dropped["recall"] < dropped["precision"] - 0.05


def test_sample_quality_is_reproducible_and_cites_its_features(fashion):
    train_x, train_y, test_x, test_y, other_x = fashion

    def sample(n, gen):  # a "model": training images in a seeded order
        return other_x[torch.randperm(len(other_x), generator=gen)[:n]].float() / 255

    def scores():
        fakes = draw_samples(sample, 400, torch.Generator().manual_seed(1234))
        return sample_quality(fakes, shipped_feature_net("fashion-mnist"), (test_x, test_y),
                              train_x, other_x)

    first = scores()
    assert first == scores()
    spec = SHIPPED["fashion-mnist"]
    for score in ("frechet", "kid", "precision_recall"):
        assert first[score]["features"] == f"{spec.name} sha256:{spec.sha256[:16]}"
    assert first["features"]["sha256"] == spec.sha256
    assert math.isfinite(first["kid"]["std"]) and first["kid"]["std"] > 0
    # Training images score like the real-against-real floor.
    assert first["frechet"]["distance"] < 3 * first["frechet"]["real_reference"] + 1
    # The floor scores as many training images as there are samples, drawn by the seed
    # alone (planted bug: as many as test images, the floor at another sample count).
    net = shipped_feature_net("fashion-mnist")[0]
    ref = train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(1234))
                  [:400]]
    assert first["frechet"]["n_reference"] == 400 < len(test_x)
    f_test, f_ref = extract_features(net, test_x), extract_features(net, ref)
    assert first["frechet"]["real_reference"] == pytest.approx(
        frechet_distance(f_test, f_ref), rel=1e-9)
    # So are the other floors (planted bug: KID's and precision/recall's floors computed
    # from the samples, not from those training images).
    kid = kernel_distance(f_test, f_ref, subset_size=400, seed=1234)
    assert (first["kid"]["real_reference"], first["kid"]["real_reference_std"]) == \
        pytest.approx(kid, rel=1e-9)
    pr = precision_recall(f_test, f_ref, 3)
    assert (first["precision_recall"]["real_precision"],
            first["precision_recall"]["real_recall"]) == (pr["precision"], pr["recall"])


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
    same, same_std = kernel_distance(real, other, subsets=20, subset_size=500)
    assert abs(same) < 3 * same_std + 1e-3
    shifted, _ = kernel_distance(real, other + 0.5, subsets=20, subset_size=500)
    assert shifted > 10 * max(same_std, 1e-3)
    # A set against itself (independent subsets of it): about 0, with its spread.
    itself, itself_std = kernel_distance(real, real, subsets=20, subset_size=500)
    assert 0 < itself_std < 0.05 and abs(itself) < 3 * itself_std
    # Seeded: the same subsets, the same numbers; another seed, other subsets.
    seeded = kernel_distance(real, other, subsets=5, subset_size=100, seed=3)
    assert seeded == kernel_distance(real, other, subsets=5, subset_size=100, seed=3)
    assert seeded != kernel_distance(real, other, subsets=5, subset_size=100, seed=4)


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


def test_precision_and_recall_match_a_direct_computation():
    gen = torch.Generator().manual_seed(1)
    real, fake = torch.randn(40, 3, generator=gen), torch.randn(30, 3, generator=gen) + 0.5
    k = 3

    def share_inside(points, centres):  # by the definition, one point at a time
        d = torch.cdist(centres.double(), centres.double())
        radii = d.sort(dim=1).values[:, k]  # column 0 is the point itself
        return np.mean([any(torch.dist(p.double(), c.double()) <= r
                            for c, r in zip(centres, radii, strict=True)) for p in points])

    got = precision_recall(real, fake, k)
    assert got["precision"] == pytest.approx(share_inside(fake, real), abs=1e-12)
    assert got["recall"] == pytest.approx(share_inside(real, fake), abs=1e-12)


def test_precision_counts_a_point_on_a_ball_s_edge():
    """The balls are closed: a point at exactly the k-th neighbour's distance is inside
    (mutation testing found ``<=`` -> ``<`` unchecked). Points on a line, k = 1: radius 1."""
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    assert precision_recall(real, torch.tensor([[4.0], [4.5]]), k=1)["precision"] == 0.5


def test_parzen_log_likelihood_by_hand():
    """The bandwidth chosen on validation, the test mean, its standard error, bits/dim on
    the 0..255 scale and whether the bandwidth sits on the grid's edge, recomputed from
    parzen_log_prob (itself checked against the direct formula above)."""
    gen = torch.Generator().manual_seed(0)
    samples, val, test = (torch.rand(n, 1, 2, 2, generator=gen, dtype=torch.float64)
                          for n in (30, 20, 10))
    sigmas = torch.tensor([0.02, 0.1, 0.3, 3.0], dtype=torch.float64)
    res = parzen_log_likelihood(samples, val, test, sigmas)
    best = int(parzen_log_prob(val, samples, sigmas).mean(1).argmax())
    assert 0 < best < 3  # not on the grid's edge, for this data
    ll = parzen_log_prob(test, samples, sigmas[best:best + 1])[0]
    assert res["sigma"] == sigmas[best].item() and res["sigma_at_grid_edge"] is False
    assert res["log_px_nats"] == pytest.approx(ll.mean().item())
    assert res["sem_nats"] == pytest.approx(ll.std().item() / math.sqrt(10))
    assert res["bits_per_dim"] == pytest.approx((-ll.mean().item() + 4 * math.log(255))
                                                / (4 * math.log(2)))
    assert res["n_samples"] == 30 and res["n_val"] == 20
    # Two test images have a standard error; one has none.
    two = parzen_log_prob(test[:2], samples, sigmas[best:best + 1])[0]
    assert parzen_log_likelihood(samples, val, test[:2], sigmas)["sem_nats"] == \
        pytest.approx(two.std().item() / math.sqrt(2))
    assert math.isnan(parzen_log_likelihood(samples, val, test[:1], sigmas)["sem_nats"])
    assert parzen_log_likelihood(samples, val, test, sigmas[:best + 1])["sigma_at_grid_edge"]
    assert parzen_log_likelihood(samples, val, test, sigmas[best:])["sigma_at_grid_edge"]
    # The default grid: 31 bandwidths from 0.01 to 1, log-spaced.
    assert parzen_log_likelihood(samples, val, test) == \
        parzen_log_likelihood(samples, val, test, torch.logspace(-2, 0, 31, dtype=torch.float64))


def test_kernel_distance_defaults():
    """100 subsets of (at most) 1000, seed 0, as documented and as sample_quality reports."""
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(300, 4, generator=gen), torch.randn(200, 4, generator=gen)
    assert kernel_distance(a, b) == kernel_distance(a, b, subsets=100, subset_size=1000, seed=0)
    assert kernel_distance(a, b) != kernel_distance(a, b, subsets=101)
    # Beyond 1000 images per set the subsets are 1000, not all of them.
    a, b = torch.randn(1001, 4, generator=gen), torch.randn(1001, 4, generator=gen)
    assert kernel_distance(a, b) == kernel_distance(a, b, subset_size=1000)
    assert kernel_distance(a, b) != kernel_distance(a, b, subset_size=1001)


def test_sample_quality_draws_its_samples_in_chunks_and_scores_them(fashion):
    """1500 samples are drawn as 1000 + 500 from one seeded generator, and the reported
    KID subsets and Parzen number are those of the same fakes recomputed here."""
    train_x, _, test_x, test_y, other_x = fashion
    drawn = []

    def sample(n, gen):
        drawn.append(n)
        return torch.rand(n, 1, 28, 28, generator=gen) * 1.2  # beyond 1: clamped

    features = shipped_feature_net("fashion-mnist")
    fakes = draw_samples(sample, 1500, torch.Generator().manual_seed(1234))
    assert drawn == [1000, 500] and fakes.max() <= 1
    res = sample_quality(fakes, features, (test_x, test_y), train_x, other_x,
                         n_parzen_val=100)
    gen = torch.Generator().manual_seed(1234)
    fakes = torch.cat([sample(1000, gen), sample(500, gen)]).clamp(0, 1)
    kid = res["kid"]
    assert (kid["subsets"], kid["subset_size"]) == (100, 500)
    f_test = extract_features(features[0], test_x)
    assert kid["mean"] == kernel_distance(f_test, extract_features(features[0], fakes),
                                          subsets=100, subset_size=500, seed=1234)[0]
    parzen = parzen_log_likelihood(fakes, other_x[:100].double() / 255, test_x.double() / 255)
    assert res["parzen"]["log_px_nats"] == pytest.approx(parzen["log_px_nats"], rel=1e-9)
    # The other scores are those of the same features: the Frechet distance, and precision
    # and recall with k = 3 neighbours.
    f_fake = extract_features(features[0], fakes)
    assert res["frechet"]["distance"] == pytest.approx(frechet_distance(f_test, f_fake),
                                                       rel=1e-9)
    pr = precision_recall(f_test, f_fake, 3)
    assert res["precision_recall"]["k"] == 3
    assert (res["precision_recall"]["precision"], res["precision_recall"]["recall"]) == \
        (pr["precision"], pr["recall"])

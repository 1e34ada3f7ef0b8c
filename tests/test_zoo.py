"""Scores for anyone's samples (dgm score), packed runs (dgm export) and the zoo."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import one_line_error

import dgm
from dgm.cli import main
from dgm.zoo import ZOO

SPLITS = ["--split", "test[64:]", "--train-split", "train[:192]", "--val-split", "test[:64]"]


def train_tiny(fake_data_dir, run, *extra):
    assert main(["train", "vae", "--dataset", "mnist", "--data-dir", str(fake_data_dir),
                 "--offline", "--train-split", "train[:192]", "--val-split", "test[:64]",
                 "--test-split", "test[64:]", "--epochs", "1", "--batch-size", "32",
                 "--hidden-dim", "16", "--sample-epochs", "", "--quiet", "--out", str(run),
                 *extra]) == 0


@pytest.fixture
def run(fake_data_dir, tmp_path):
    run = tmp_path / "run"
    train_tiny(fake_data_dir, run, "--ema", "0.9")
    return run


def json_out(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


SCORES = ("features", "frechet", "kid", "precision_recall", "parzen")


def test_score_gives_what_evaluate_gives_for_the_same_samples(run, fake_data_dir, tmp_path,
                                                              capsys):
    """Planted bug: floors drawn from the generator after the samples (as dgm did), so that
    they depend on the sampler and dgm score cannot reproduce them."""
    evaluated = json_out(capsys, ["evaluate", str(run), "--sample-quality", "--iw-samples", "2",
                                  "--no-naive", "--num-samples", "2000", "--json"])
    npz = tmp_path / "s.npz"
    assert main(["sample", str(run), "-n", "2000", "--seed", "1234", "--npz", str(npz)]) == 0
    capsys.readouterr()
    with np.load(npz) as f:
        assert list(f) == ["samples"] and f["samples"].shape == (2000, 28, 28)
        assert f["samples"].dtype == np.float32
    scored = json_out(capsys, ["score", str(npz), "--dataset", "mnist", "--data-dir",
                               str(fake_data_dir), "--offline", *SPLITS, "--json"])
    assert scored["n_samples"] == 2000 and scored["n_images"] == evaluated["n_images"]
    for key in SCORES:
        assert scored[key] == evaluated[key], key


def test_uint8_npz_png_folder_and_floats_score_alike(fake_data_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "u8.npz", images)
    np.savez(tmp_path / "f.npz", x=images[..., None].astype(np.float64) / 255)
    (tmp_path / "pngs").mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(tmp_path / "pngs" / f"{i:03d}.png")
    common = ["--dataset", "mnist", "--data-dir", str(fake_data_dir), "--offline", *SPLITS,
              "--json"]
    results = [json_out(capsys, ["score", str(tmp_path / name), *common])
               for name in ("u8.npz", "f.npz", "pngs")]
    for key in SCORES:
        assert results[0][key] == results[1][key] == results[2][key], key
    # Noise is far from the data: far above the floor, hardly any precision.
    fd = results[0]["frechet"]
    assert fd["distance"] > 10 * fd["real_reference"]


def test_score_refuses_what_it_cannot_score(fake_data_dir, tmp_path, capsys):
    common = ["--dataset", "mnist", "--data-dir", str(fake_data_dir), "--offline", *SPLITS]
    cases = {
        "few.npz": (np.zeros((3, 28, 28), np.uint8), "need at least 4"),
        "size.npz": (np.zeros((10, 32, 32), np.uint8), "holds images of shape (1, 32, 32)"),
        "high.npz": (np.full((10, 28, 28), 1.5), "floats from 1.5 to 1.5"),
        "nan.npz": (np.full((10, 28, 28), np.nan), "give floats in [0, 1]"),
        "int.npz": (np.zeros((10, 28, 28), np.int32), "holds int32 values"),
        "flat.npz": (np.zeros((10, 784), np.uint8), "expected images"),
    }
    for name, (array, match) in cases.items():
        np.savez(tmp_path / name, array)
        one_line_error(capsys, 1, ["score", str(tmp_path / name), *common], match)
    np.savez(tmp_path / "two.npz", a=np.zeros(1), b=np.zeros(1))
    one_line_error(capsys, 1, ["score", str(tmp_path / "two.npz"), *common], "holds 2 arrays")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    one_line_error(capsys, 1, ["score", str(tmp_path / "bad.npz"), *common], "not a readable")
    one_line_error(capsys, 1, ["score", str(tmp_path / "none.npz"), *common], "no such file")
    one_line_error(capsys, 1, ["score", str(tmp_path / "few.npz"), "--dataset",
                               str(tmp_path / "few.npz")], "has none")


def test_a_packed_run_is_read_wherever_a_run_folder_is(run, tmp_path, capsys):
    """Planted bugs: packing the raw weights of an --ema run (evaluation uses the average);
    a packed run's evaluation saved nowhere but claimed saved."""
    packed = tmp_path / "run.safetensors"
    assert main(["export", str(run), str(packed)]) == 0
    one_line_error(capsys, 1, ["export", str(run), str(packed)], "exists already")
    from_run, from_file = dgm.load(run), dgm.load(packed)
    assert not from_file.training
    a, b = from_run.state_dict(), from_file.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    ev = ["--iw-samples", "4", "--json"]
    assert json_out(capsys, ["evaluate", str(packed), *ev]) == \
        json_out(capsys, ["evaluate", str(run), *ev])
    assert main(["evaluate", str(packed), "--iw-samples", "4"]) == 0
    assert "not saved" in capsys.readouterr().out
    for argv in (["sample", "-n", "4", "--out", str(tmp_path / "s.png")],
                 ["interpolate", "--rows", "2", "--steps", "3", "--out", str(tmp_path / "i.png")],
                 ["report", "--out", str(tmp_path / "r.html")]):
        assert main([argv[0], str(packed), *argv[1:]]) == 0
    page = (tmp_path / "r.html").read_text()
    assert str(packed) in page and page.count("<img") >= 2  # curves and drawn samples
    assert main(["report", str(run), str(packed), "--out", str(tmp_path / "c.html")]) == 0
    one_line_error(capsys, 1, ["report", str(packed)], "give --out FILE.html")
    one_line_error(capsys, 1, ["train", "vae", "--resume", str(packed)], "not a dgm run folder")
    (tmp_path / "junk.safetensors").write_bytes(b"\x08" + b"\0" * 20)
    one_line_error(capsys, 1, ["sample", str(tmp_path / "junk.safetensors"), "--out",
                               str(tmp_path / "j.png")], "not a run that 'dgm export' packed")
    one_line_error(capsys, 1, ["sample", "zoo:no-such-model", "--out", str(tmp_path / "z.png")],
                   "no zoo model 'no-such-model'")


def test_sample_refuses_without_a_destination_or_over_a_file(run, tmp_path, capsys):
    one_line_error(capsys, 1, ["sample", str(run)], "say where the samples go")
    (tmp_path / "mine.npz").write_text("mine")
    one_line_error(capsys, 1, ["sample", str(run), "--npz", str(tmp_path / "mine.npz")],
                   "exists already")
    assert (tmp_path / "mine.npz").read_text() == "mine"
    one_line_error(capsys, 1, ["sample", str(run), "-n", "5000", "--out", str(tmp_path / "g.png")],
                   "-n must lie in 1..4096 for a grid")


def test_zoo_lists_what_ships(capsys):
    assert ZOO, "the zoo ships at least the report's VAE"
    listed = json_out(capsys, ["zoo", "--json"])
    assert [m["name"] for m in listed] == list(ZOO)
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    for name, m in ZOO.items():
        assert f"zoo:{name}" in out and m.sha256 in out


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_models_reproduce_their_recorded_numbers(name, real_data_dir, capsys):
    """Each zoo model, evaluated on a slice of the test set, gives the numbers recorded for
    that slice when it was packed (to the printed digits)."""
    m = ZOO[name]
    res = json_out(capsys, ["evaluate", f"zoo:{name}", "--data-dir", str(real_data_dir),
                            *m.check_args, "--json"])
    assert m.check  # an entry with nothing recorded would pass any model
    for path, expected in m.check.items():
        value = res
        for key in path.split("."):
            value = value[key]
        assert abs(value - expected) < 0.01, path  # the printed digits, on any CPU


@pytest.mark.parametrize("name", list(ZOO)[:1])
def test_a_tampered_zoo_file_is_refused(name, tmp_path, monkeypatch, capsys):
    import dgm.zoo

    copy = tmp_path / f"{name}.safetensors"
    shutil.copy(dgm.zoo.ZOO_DIR / copy.name, copy)
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    monkeypatch.setattr(dgm.zoo, "ZOO_DIR", tmp_path)
    one_line_error(capsys, 1, ["sample", f"zoo:{name}", "--out", str(tmp_path / "s.png")],
                   "not the")

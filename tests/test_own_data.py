"""Your own data: IDX folders, .npz files and PNG folders, grey or colour, any fixed size,
through the whole command line; every broken file is refused with one line."""

import gzip
import io
import json
import math
import zipfile

import numpy as np
import pytest
import torch
from conftest import write_idx
from PIL import Image

from dgm.cli import main
from dgm.data import load_split
from dgm.errors import DgmError

TINY = {"vae": ["--hidden-dim", "16", "--latent-dim", "2"], "gan": ["--latent-dim", "8"],
        "flow": ["--num-couplings", "1", "--hidden-dim", "8"],
        "diffusion": ["--channels", "4", "--channel-mults", "1,2,2", "--sample-steps", "1"]}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """A data set of your own trains a feature network, cached in the test's folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def blobs(n: int, h: int, w: int, c: int | None = None, seed: int = 0):
    """n uint8 images (n, h, w[, c]) of a bright blob whose place is the label (0..3)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    yy, xx = np.mgrid[:h, :w]
    cx = (1 + labels) * w / 5
    img = 255 * np.exp(-((yy[None] - h / 2) ** 2 + (xx[None] - cx[:, None, None]) ** 2) / 4)
    img = img.round().astype(np.uint8)
    if c is not None:
        img = np.stack([img, img[:, ::-1], 255 - img][:c], axis=-1)
    return img, labels


def write_source(kind: str, folder, labels: bool = True):
    """A tiny data set of one kind; returns (its path, extra split flags)."""
    if kind == "idx":  # grey 12x12, gzip and raw mixed as users' folders may be
        for prefix, n, gz in (("train", 48, True), ("t10k", 16, False)):
            x, y = blobs(n, 12, 12, seed=n)
            write_idx(folder / f"{prefix}-images-idx3-ubyte", x, gz=gz)
            if labels:
                write_idx(folder / f"{prefix}-labels-idx1-ubyte", y, gz=gz)
        return folder, []
    if kind == "npz":  # grey 16x16 as (N, H, W, 1)
        (xtr, ytr), (xte, yte) = blobs(48, 16, 16, 1), blobs(16, 16, 16, 1, seed=1)
        path = folder / "data.npz"
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"x_train": xtr, "x_test": xte}
        if labels:
            arrays |= {"y_train": ytr, "y_test": yte}
        np.savez(path, **arrays)
        return path, []
    # png: RGB 8x8; train and test are the same sorted list, sliced apart
    x, _ = blobs(40, 8, 8, 3)
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(x):
        Image.fromarray(img).save(folder / f"img_{i:03d}.png")
    return folder, ["--train-split", "train[:80%]", "--val-split", "train[80%:90%]",
                    "--test-split", "test[90%:]"]


def one_line_error(capsys, argv, match, code=1):
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("dgm: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert match in errors[0], err


def train_argv(model, data, run, *extra):
    return ["train", model, "--dataset", str(data), "--out", str(run), "--epochs", "1",
            "--batch-size", "16", "--quiet", *TINY[model], *extra]


@pytest.mark.parametrize("kind", ["idx", "npz", "png"])
def test_each_source_trains_evaluates_samples_and_reports(kind, tmp_path, capsys):
    data, splits = write_source(kind, tmp_path / "data")
    run = tmp_path / "run"
    assert main(train_argv("vae", data, run, *splits)) == 0
    assert (run / "samples" / "epoch_001.png").is_file()
    assert (run / "manifold" / "epoch_001.png").is_file()
    if kind == "png":  # no labels: the feature classifier cannot learn, so it is refused
        one_line_error(capsys, ["evaluate", str(run), "--iw-samples", "5", "--sample-quality"],
                       "needs class labels")
        quality = []
    else:
        quality = ["--sample-quality"]
    assert main(["evaluate", str(run), "--iw-samples", "5", "--num-samples", "100", "--json",
                 *quality]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["iwae"]["k"] == 5 and math.isfinite(res["iwae"]["bits_per_dim"])
    assert ("frechet" in res) == (kind != "png")
    assert main(["sample", str(run), "-n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").stat().st_size > 0


def test_what_each_source_gives(tmp_path):
    for kind, shape, has_labels in (("idx", (1, 12, 12), True), ("npz", (1, 16, 16), True),
                                    ("png", (3, 8, 8), False)):
        data, _ = write_source(kind, tmp_path / kind)
        x, y = load_split(str(data), "train[:10]")
        assert x.dtype == torch.uint8 and tuple(x.shape) == (10, *shape), kind
        assert y.dtype == torch.int64 and ((y >= 0).all() if has_labels else (y == -1).all())
    x, _ = load_split(str(tmp_path / "png"), "test[90%:]")
    assert len(x) == 4
    # the PNGs come back as written, in file-name order
    first = np.asarray(Image.open(tmp_path / "png" / "img_000.png"))
    assert torch.equal(load_split(str(tmp_path / "png"), "train[:1]")[0][0],
                       torch.from_numpy(first.copy()).permute(2, 0, 1))
    # labels are optional; without them they are -1
    data, _ = write_source("idx", tmp_path / "bare", labels=False)
    assert (load_split(str(data), "test")[1] == -1).all()


@pytest.mark.parametrize("model", ["vae", "gan", "gan-conv", "flow", "diffusion"])
def test_builtin_models_on_32x32_rgb(model, tmp_path, capsys):
    x, _ = blobs(80, 32, 32, 3)
    data = tmp_path / "rgb.npz"
    np.savez(data, x_train=x[:64], x_test=x[64:])
    run = tmp_path / "run"
    extra = ["--arch", "conv", "--hidden-dim", "8"] if model == "gan-conv" else []
    model = model.removesuffix("-conv")
    assert main(train_argv(model, data, run) + extra) == 0
    assert Image.open(run / "samples" / "epoch_001.png").mode == "RGB"
    assert main(["evaluate", str(run), "--iw-samples", "5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_images"] == 16
    if model == "gan":  # no labels: the Frechet score is skipped with a note, not a crash
        assert res["sample_quality"].startswith("skipped")
    else:  # bits/dim count all 3 * 32 * 32 dimensions
        if model == "diffusion":
            b = res["nll_bound"]
            assert b["bits_per_dim"] == pytest.approx(b["nll_bound_nats"] / (3072 * math.log(2)))
        else:
            ll = res["elbo"] if model == "vae" else res["log_px"]
            assert ll["bits_per_dim"] == pytest.approx(-ll["log_px_nats"] / (3072 * math.log(2)))
    assert main(["report", str(run)]) == 0
    # The model is rebuilt from the checkpoint's image shape: no data needed to draw.
    data.rename(tmp_path / "moved.npz")
    out = tmp_path / "s.png"
    assert main(["sample", str(run), "-n", "4", "--out", str(out)]) == 0
    assert Image.open(out).mode == "RGB"


def test_flow_needs_sizes_its_squeezes_divide(tmp_path, capsys):
    x, _ = blobs(40, 30, 30)
    np.savez(tmp_path / "d.npz", x_train=x, x_test=x[:8])
    one_line_error(capsys, train_argv("flow", tmp_path / "d.npz", tmp_path / "run"),
                   "divisible by 4, and these images are 30x30; use --num-scales 1")


def test_conv_gan_needs_sizes_its_strides_divide(tmp_path, capsys):
    x, _ = blobs(40, 30, 30)
    np.savez(tmp_path / "d.npz", x_train=x, x_test=x[:8])
    one_line_error(capsys, train_argv("gan", tmp_path / "d.npz", tmp_path / "run") +
                   ["--arch", "conv"], "H and W must be divisible by 4; these images are 30x30")


def npy_bytes(array: np.ndarray, cut: int = 0) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()[:len(buf.getvalue()) - cut]


def test_broken_sources_give_one_line(tmp_path, capsys):
    x, y = blobs(40, 8, 8)
    cases = []

    def case(path, match, split="train"):
        cases.append((path, match, split))

    good = tmp_path / "good.npz"
    np.savez(good, x_train=x, y_train=y, x_test=x)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:-100])
    case(truncated, "truncated.npz is not a readable .npz file")
    lying = tmp_path / "lying.npz"  # a valid zip whose array holds fewer bytes than declared
    with zipfile.ZipFile(lying, "w") as zf:
        zf.writestr("x_train.npy", npy_bytes(x, cut=64))
    case(lying, "lying.npz is corrupt: x_train.npy declares (40, 8, 8) uint8")
    floats = tmp_path / "floats.npz"
    np.savez(floats, x_train=x.astype(np.float32))
    case(floats, "floats.npz: x_train holds float32 values")
    labels = tmp_path / "labels.npz"
    np.savez(labels, x_train=x, y_train=y[:-1])
    case(labels, "labels.npz: y_train holds int64 labels of shape (39,); expected 40")
    no_test = tmp_path / "no_test.npz"
    np.savez(no_test, x_train=x)
    case(no_test, "no_test.npz has no array x_test", split="test")
    shape = tmp_path / "shape.npz"
    np.savez(shape, x_train=np.zeros((4, 8, 8, 2), np.uint8))
    case(shape, "holds an array of shape (4, 8, 8, 2)")

    idx = tmp_path / "idx"
    write_idx(idx / "train-images-idx3-ubyte", x, gz=False)
    raw = (idx / "train-images-idx3-ubyte").read_bytes()
    (idx / "train-images-idx3-ubyte").write_bytes(raw[:-10])
    case(idx, "train-images-idx3-ubyte is corrupt")
    idx_labels = tmp_path / "idx_labels"
    write_idx(idx_labels / "train-images-idx3-ubyte", x)
    write_idx(idx_labels / "train-labels-idx1-ubyte", y[:30])
    case(idx_labels, "train-labels-idx1-ubyte.gz holds uint8 labels of shape (30,)")
    idx_float = tmp_path / "idx_float"
    idx_float.mkdir()
    header = bytes([0, 0, 0x0D, 3]) + b"".join(d.to_bytes(4, "big") for d in (2, 4, 4))
    (idx_float / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(header + np.zeros(32, ">f4").tobytes()))
    case(idx_float, "holds >f4 values", split="test")
    case(idx_float, "has no train-images-idx3-ubyte[.gz]")

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(x[0]).save(mixed / "a.png")
    Image.fromarray(blobs(1, 9, 8)[0][0]).save(mixed / "b.png")
    case(mixed, "b.png is 8x9 grey but a.png is 8x8 grey")
    colours = tmp_path / "colours"
    colours.mkdir()
    Image.fromarray(x[0]).save(colours / "a.png")
    Image.fromarray(blobs(1, 8, 8, 3)[0][0]).save(colours / "b.png")
    case(colours, "b.png is 8x8 RGB but a.png is 8x8 grey")
    broken = tmp_path / "broken"
    broken.mkdir()
    Image.fromarray(x[0]).save(broken / "a.png")
    (broken / "b.png").write_bytes((broken / "a.png").read_bytes()[:40])
    case(broken, "b.png")
    rgba = tmp_path / "rgba"
    rgba.mkdir()
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(rgba / "a.png")
    case(rgba, "a.png has PIL mode RGBA")
    empty = tmp_path / "empty"
    empty.mkdir()
    case(empty, "holds neither IDX files")
    case(tmp_path / "nowhere.npz", "unknown data set")

    for path, match, split in cases:
        with pytest.raises(DgmError, match=None) as e:
            load_split(str(path), split)
        assert match in str(e.value) and "\n" not in str(e.value), (match, str(e.value))
    # and through the command line, one line each
    one_line_error(capsys, train_argv("vae", truncated, tmp_path / "r1"), "truncated.npz")
    one_line_error(capsys, train_argv("vae", mixed, tmp_path / "r2"), "b.png is 8x9 grey")
    one_line_error(capsys, train_argv("vae", "cifar", tmp_path / "r3"),
                   "option dataset must be mnist, fashion-mnist, or a path")

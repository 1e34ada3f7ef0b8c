import gzip
import hashlib

import numpy as np
import pytest
import torch
from conftest import write_idx

from dgm import data
from dgm.data import IdxFile, binarize, find_file, load_split, parse_split, read_idx, verify
from dgm.errors import DgmError


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, gz):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "x-idx3-ubyte", a, gz=gz)
    np.testing.assert_array_equal(read_idx(path), a)


@pytest.mark.parametrize(("raw", "problem"), [
    (b"\x00\x00\x08", "bad magic"),
    (b"\x12\x34\x08\x01" + b"\x00" * 8, "bad magic"),
    (b"\x00\x00\x08\x03\x00\x00", "truncated"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x05abc", "declares"),
    (b"\x00\x00\x08\x03\x7f\xff\xff\xff\x7f\xff\xff\xff\x7f\xff\xff\xff", "declares"),
    (b"\x1f\x8b\x08garbage", "cannot read"),
])
def test_read_idx_rejects_bad_files(tmp_path, raw, problem):
    path = tmp_path / f"bad-{hashlib.md5(raw).hexdigest()}"
    path.write_bytes(raw)
    with pytest.raises(DgmError, match=problem):
        read_idx(path)


def test_parse_split():
    assert parse_split("train") == ("train", None, None)
    assert parse_split("test[:9000]") == ("test", None, 9000)
    assert parse_split("test[9000:]") == ("test", 9000, None)
    assert parse_split("train[:90%]") == ("train", None, 0.9)
    assert parse_split("train[10%:-5]") == ("train", 0.1, -5)
    for bad in ("valid", "train[1]", "train[:x]", "train[:101%]", "test[::2]"):
        with pytest.raises(DgmError, match="bad split"):
            parse_split(bad)


def test_load_split_slices(fake_data_dir):
    full, labels = load_split("mnist", "train", fake_data_dir)
    assert full.shape == (256, 1, 28, 28) and full.dtype == torch.uint8
    assert labels.shape == (256,) and labels.dtype == torch.int64
    head, _ = load_split("mnist", "train[:50%]", fake_data_dir)
    tail, _ = load_split("mnist", "train[50%:]", fake_data_dir)
    assert torch.equal(torch.cat([head, tail]), full)
    last, _ = load_split("mnist", "test[-10:]", fake_data_dir)
    assert torch.equal(last, load_split("mnist", "test", fake_data_dir)[0][-10:])
    with pytest.raises(DgmError, match="empty"):
        load_split("mnist", "test[5:5]", fake_data_dir)


def test_lookup_order_and_offline_error(fake_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DGM_DATA_DIR", raising=False)
    cached = write_idx(tmp_path / "cache" / "dgm" / "mnist" / "t10k-images-idx3-ubyte",
                       np.zeros((1, 2, 2)))
    assert find_file("mnist", "test-images", fake_data_dir) == \
        fake_data_dir / "mnist" / "t10k-images-idx3-ubyte.gz"
    assert find_file("mnist", "test-images", None, offline=True) == cached
    monkeypatch.setenv("DGM_DATA_DIR", str(fake_data_dir))
    assert find_file("mnist", "test-images").parent == fake_data_dir / "mnist"
    with pytest.raises(DgmError) as e:
        find_file("fashion-mnist", "train-images", tmp_path / "nowhere", offline=True)
    msg = str(e.value)
    assert "nowhere" in msg and "cache" in msg and "/usr/share/datasets" in msg and "fix:" in msg


def test_unknown_dataset():
    with pytest.raises(DgmError, match="unknown data set 'cifar'.*mnist"):
        load_split("cifar", "train")


def test_download_checks_checksum(tmp_path, monkeypatch):
    images = np.arange(16, dtype=np.uint8).reshape(1, 4, 4)
    mirror = tmp_path / "mirror"
    src = write_idx(mirror / "t10k-images-idx3-ubyte", images)
    raw = gzip.decompress(src.read_bytes())
    good = IdxFile("t10k-images-idx3-ubyte", hashlib.sha256(raw).hexdigest(), "")
    bad = IdxFile("t10k-images-idx3-ubyte", "0" * 64, "")
    ds = data.Dataset(mirrors=(mirror.as_uri() + "/",), files={"test-images": good}, classes=())
    monkeypatch.setitem(data.DATASETS, "toy", ds)
    dest = data.download("toy", "test-images", dest_dir=tmp_path / "cache")
    np.testing.assert_array_equal(read_idx(dest), images)
    monkeypatch.setitem(data.DATASETS, "toy", data.Dataset(ds.mirrors, {"test-images": bad}, ()))
    with pytest.raises(DgmError, match="SHA-256"):
        data.download("toy", "test-images", dest_dir=tmp_path / "cache2")
    assert not (tmp_path / "cache2").exists()  # nothing unverified is kept, no empty folder


def test_shared_data_checksums(real_data_dir):
    for name in ("mnist", "fashion-mnist"):
        info = data.DATASETS[name].files["test-labels"]
        assert verify(find_file(name, "test-labels", real_data_dir, offline=True), info) is None


def test_binarize_draws_bernoulli_of_intensity_over_255():
    """Pixel k is 1 with probability k / 255: 255 always, 0 never, the rest at that rate
    (planted bug: k / 256, which sometimes turns a white pixel black)."""
    gen = torch.Generator().manual_seed(0)
    assert binarize(torch.full((10**5,), 255, dtype=torch.uint8), gen).min() == 1
    assert binarize(torch.zeros(10**5, dtype=torch.uint8), gen).max() == 0
    for k in (1, 64, 200, 254):
        rate = binarize(torch.full((10**5,), k, dtype=torch.uint8), gen).mean().item()
        p = k / 255
        assert abs(rate - p) < 5 * (p * (1 - p) / 10**5) ** 0.5 + 1e-9, (k, rate)

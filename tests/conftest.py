"""Shared fixtures: real data from DGM_DATA_DIR (or ../shared/data), and tiny IDX files."""

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> Path:
    """Write a uint8 array as an IDX file (gzip-compressed by default)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The folder holding mnist/ and fashion-mnist/ IDX files; tests using it skip without it."""
    for candidate in (os.environ.get("DGM_DATA_DIR"), ROOT.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "fashion-mnist").is_dir():
            return Path(candidate)
    pytest.skip("no real data: set DGM_DATA_DIR to a folder with fashion-mnist/ and mnist/")


@pytest.fixture
def fake_data_dir(tmp_path) -> Path:
    """A data folder with a tiny synthetic 'mnist' (train 256, test 128 images of blobs)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 256), ("t10k", 128)):
        labels = rng.integers(0, 10, n)
        yy, xx = np.mgrid[:28, :28]
        centres = 6 + 2 * labels  # each class a blob in a different place
        images = 255 * np.exp(-((yy[None] - 14) ** 2 + (xx[None] - centres[:, None, None]) ** 2)
                              / 18.0)
        write_idx(tmp_path / "mnist" / f"{split}-images-idx3-ubyte", images.round())
        write_idx(tmp_path / "mnist" / f"{split}-labels-idx1-ubyte", labels)
    return tmp_path


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tests' tensors are tiny: one intra-op thread is as fast, and where the cores are
    shared with other processes two OpenMP threads spin against them (seen: 15-50x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)

"""The built-in data sets (MNIST, Fashion-MNIST): where they are looked for, their
checksums, the download.

Where a data set is looked for, in order: the directory the user names (``--data-dir``
or ``DGM_DATA_DIR``), the user's cache, Debian's ``/usr/share/datasets/<name>/``, then a
checksummed download into the cache.
"""

import hashlib
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dgm.data.idx import read_bytes, read_idx
from dgm.data.splits import parse_split, slice_of
from dgm.errors import DgmError

__all__ = ["DATASETS", "Dataset", "IdxFile", "default_cache_dir", "download", "find_file",
           "load_builtin", "search_dirs", "verify"]


@dataclass(frozen=True)
class IdxFile:
    name: str  # file name without .gz
    sha256: str | None  # of the decompressed bytes, where known
    gz_md5: str  # of the upstream .gz, checked on download when sha256 is unknown


@dataclass(frozen=True)
class Dataset:
    mirrors: tuple[str, ...]
    files: dict  # "<split>-images" / "<split>-labels" -> IdxFile
    classes: tuple[str, ...]


DATASETS = {
    "mnist": Dataset(
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        files={
            "train-images": IdxFile("train-images-idx3-ubyte", None,
                                    "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            "train-labels": IdxFile("train-labels-idx1-ubyte", None,
                                    "d53e105ee54ea40749a09fcbcd1e9432"),
            "test-images": IdxFile(
                "t10k-images-idx3-ubyte",
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                "9fb629c4189551a2d022fa330f9573f3"),
            "test-labels": IdxFile(
                "t10k-labels-idx1-ubyte",
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
                "ec29112dd5afa0611ce80d1b7f02629c"),
        },
        classes=tuple(str(i) for i in range(10)),
    ),
    "fashion-mnist": Dataset(
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        files={
            "train-images": IdxFile(
                "train-images-idx3-ubyte",
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            "train-labels": IdxFile(
                "train-labels-idx1-ubyte",
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                "25c81989df183df01b3e8a0aad5dffbe"),
            "test-images": IdxFile(
                "t10k-images-idx3-ubyte",
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                "bef4ecab320f06d8554ea6380940ec79"),
            "test-labels": IdxFile(
                "t10k-labels-idx1-ubyte",
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                "bb300cfdad3c16e7a12a480ee83cd310"),
        },
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot"),
    ),
}

def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dgm"


def search_dirs(dataset: str, data_dir: str | Path | None = None) -> list[Path]:
    """Every directory where ``dataset`` is looked for, in order."""
    data_dir = data_dir or os.environ.get("DGM_DATA_DIR")
    dirs = []
    if data_dir:
        dirs.append(Path(data_dir) / dataset)
    dirs += [default_cache_dir() / dataset, Path("/usr/share/datasets") / dataset]
    return dirs


def _dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise DgmError(f"unknown data set {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def find_file(dataset: str, key: str, data_dir: str | Path | None = None,
              offline: bool = False) -> Path:
    """Locate one IDX file (``key`` like 'train-images'), downloading it if allowed."""
    info = _dataset(dataset).files[key]
    dirs = search_dirs(dataset, data_dir)
    for d in dirs:
        for candidate in (d / info.name, d / (info.name + ".gz")):
            if candidate.is_file():
                return candidate
    looked = ", ".join(str(d) for d in dirs)
    fix = (f"put {info.name}[.gz] in {dirs[0]} or point --data-dir / DGM_DATA_DIR at a folder "
           f"holding {dataset}/{info.name}[.gz]")
    if offline:
        raise DgmError(f"{dataset} file {info.name} not found (offline, so no download); "
                       f"looked in: {looked}; fix: {fix}")
    try:
        return download(dataset, key)
    except DgmError as e:
        raise DgmError(f"{dataset} file {info.name} not found; looked in: {looked}; "
                       f"download failed: {e}; fix: {fix}") from None


def download(dataset: str, key: str, mirrors: tuple[str, ...] | None = None,
             dest_dir: Path | None = None) -> Path:
    """Download one file into the cache, checking its checksum before it is kept."""
    ds = _dataset(dataset)
    info = ds.files[key]
    dest_dir = dest_dir or default_cache_dir() / dataset
    dest = dest_dir / (info.name + ".gz")
    errors = []
    made = not dest_dir.exists()
    for mirror in mirrors or ds.mirrors:
        url = mirror + info.name + ".gz"
        tmp = None
        try:
            dest_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=dest_dir, prefix=".", suffix=".part",
                                             delete=False) as tmp:
                _fetch(url, tmp)
            problem = verify(tmp.name, info)
            if problem:
                errors.append(f"{url}: {problem}")
                continue
            os.replace(tmp.name, dest)
            return dest
        except (OSError, DgmError) as e:
            errors.append(f"{url}: {getattr(e, 'reason', e)}")
        finally:
            if tmp is not None and os.path.exists(tmp.name):  # a failed or refused download
                os.unlink(tmp.name)
    if made and dest_dir.is_dir() and not any(dest_dir.iterdir()):
        dest_dir.rmdir()
    raise DgmError("; ".join(errors))


def _fetch(url: str, out) -> None:
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=30) as r:
        total = int(r.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1],
                  disable=None) as bar:
            while chunk := r.read(1 << 16):
                out.write(chunk)
                bar.update(len(chunk))


def verify(path: str | Path, info: IdxFile) -> str | None:
    """Return None if the file's checksum matches, else what is wrong."""
    if info.sha256:
        digest = hashlib.sha256(read_bytes(str(path))).hexdigest()
        return None if digest == info.sha256 else f"SHA-256 of decompressed bytes is {digest}"
    with open(path, "rb") as f:
        digest = hashlib.md5(f.read()).hexdigest()
    return None if digest == info.gz_md5 else f"MD5 is {digest}, expected {info.gz_md5}"


def load_builtin(dataset: str, split: str = "train", data_dir: str | Path | None = None,
                 offline: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a (sliced) split of a built-in data set: uint8 (N, C, H, W), int64 labels (N,)."""
    _dataset(dataset)
    base, start, stop = parse_split(split)
    images = read_idx(find_file(dataset, f"{base}-images", data_dir, offline))
    labels = read_idx(find_file(dataset, f"{base}-labels", data_dir, offline))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DgmError(f"{dataset} {base} files have shapes {images.shape} and {labels.shape}, "
                       "not (N, H, W) images with N labels; fetch them again")
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
        raise DgmError(f"{dataset} {base} images are {images.dtype} of size "
                       f"{'x'.join(map(str, images.shape[1:]))}, not the 8-bit 28x28 images of "
                       f"{dataset}; fetch the files again")
    s = slice_of(len(images), start, stop)
    x = torch.from_numpy(images[s].copy()).unsqueeze(1)
    y = torch.from_numpy(labels[s].astype(np.int64))
    if len(x) == 0:
        raise DgmError(f"split {split!r} of {dataset} is empty ({len(images)} images in {base})")
    return x, y

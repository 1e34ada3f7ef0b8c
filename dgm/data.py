"""The data layer: find, verify, read and slice the IDX image data sets.

A split is held whole as one uint8 tensor of shape (N, C, H, W); training
takes batches from it by index on the model's device, so no per-batch Python
decoding happens. Where a data set is looked for, in order: the directory the
user names (``--data-dir`` or ``DGM_DATA_DIR``), the user's cache, Debian's
``/usr/share/datasets/<name>/``, then a checksummed download into the cache.
A data set that is not a built-in one is a path to your own images (:mod:`dgm.own_data`).
"""

import gzip
import hashlib
import os
import re
import tempfile
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from dgm.errors import DgmError

__all__ = ["DATASETS", "binarize", "find_file", "load_split", "parse_split", "read_idx",
           "split_overlap"]


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

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MAX_BYTES = 1 << 30  # no IDX data set here is near 1 GiB; refuse gzip bombs and absurd headers


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or gzip) into a read-only array, checking its header and size."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DgmError(f"cannot read {path}: {e.strerror}") from None
    return _read_idx(str(path), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=16)
def _read_idx(path: str, mtime_ns: int, size: int) -> np.ndarray:  # stat keys the cache
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DgmError(f"{path} is not an IDX file (bad magic number); "
                       "delete it and fetch it again")
    ndim = raw[3]
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise DgmError(f"{path} is a truncated IDX file (incomplete header); fetch it again")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
    body = len(raw) - 4 - 4 * ndim
    if expected != body:
        raise DgmError(f"{path} is corrupt: its header declares {shape} ({expected} bytes) "
                       f"but it holds {body} bytes; delete it and fetch it again")
    array = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(shape)
    return array


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            stream = gzip.GzipFile(fileobj=f) if head == b"\x1f\x8b" else f
            raw = stream.read(_MAX_BYTES + 1)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DgmError(f"cannot read {path}: {e}; delete it and fetch it again") from None
    if len(raw) > _MAX_BYTES:
        raise DgmError(f"{path} decompresses to over 1 GiB, which no IDX data set here does")
    return raw


def parse_split(spec: str) -> tuple[str, int | float | None, int | float | None]:
    """Parse ``train``, ``test[:9000]``, ``test[9000:]``, ``train[:90%]`` into (base, start, stop).

    Integer bounds are counts; bounds ending in % are fractions of the split, as a float in [0, 1].
    """
    m = re.fullmatch(r"\s*(train|test)\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*", spec)
    if not m:
        raise DgmError(f"bad split {spec!r}: use 'train' or 'test', optionally sliced, "
                       "e.g. 'test[:9000]', 'test[9000:]', 'train[:90%]'")

    def bound(s: str | None) -> int | float | None:
        if s is None:
            return None
        if s.endswith("%"):
            pct = int(s[:-1])
            if not -100 <= pct <= 100:
                raise DgmError(f"bad split {spec!r}: percentages must lie in [-100%, 100%]")
            return pct / 100
        return int(s)

    return m.group(1), bound(m.group(2)), bound(m.group(3))


def _slice(n: int, start: int | float | None, stop: int | float | None) -> slice:
    def index(b: int | float | None) -> int | None:
        return round(b * n) if isinstance(b, float) else b

    return slice(index(start), index(stop))


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
        digest = hashlib.sha256(_read_bytes(str(path))).hexdigest()
        return None if digest == info.sha256 else f"SHA-256 of decompressed bytes is {digest}"
    with open(path, "rb") as f:
        digest = hashlib.md5(f.read()).hexdigest()
    return None if digest == info.gz_md5 else f"MD5 is {digest}, expected {info.gz_md5}"


def load_split(dataset: str, split: str = "train", data_dir: str | Path | None = None,
               offline: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a (sliced) split as ``(images, labels)``: uint8 (N, C, H, W) and int64 (N,).

    ``dataset`` is a built-in name or a path to your own images (see :mod:`dgm.own_data`,
    whose labels are -1 where the source has none).
    """
    if dataset not in DATASETS:
        from dgm.own_data import load_own  # it reads IDX files with this module's reader

        return load_own(dataset, split)
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
    s = _slice(len(images), start, stop)
    x = torch.from_numpy(images[s].copy()).unsqueeze(1)
    y = torch.from_numpy(labels[s].astype(np.int64))
    if len(x) == 0:
        raise DgmError(f"split {split!r} of {dataset} is empty ({len(images)} images in {base})")
    return x, y


def split_overlap(dataset: str, a: str, b: str, data_dir: str | Path | None = None,
                  offline: bool = False) -> int:
    """How many images the splits ``a`` and ``b`` of ``dataset`` share (e.g. 'test[:9000]'
    and 'test[8000:]' share 1000). In a PNG folder 'train' and 'test' are the same images."""
    base_a, *bounds_a = parse_split(a)
    base_b, *bounds_b = parse_split(b)
    if base_a != base_b:
        from dgm.own_data import source_kind

        if dataset in DATASETS or source_kind(dataset) != "png":
            return 0
    n = len(load_split(dataset, base_a, data_dir, offline)[0])
    ra, rb = range(n)[_slice(n, *bounds_a)], range(n)[_slice(n, *bounds_b)]
    return max(0, min(ra.stop, rb.stop) - max(ra.start, rb.start)) if ra and rb else 0


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample Bernoulli(intensity / 255) pixels: uint8 -> float {0, 1} of the same shape.

    As 255 u < x with u ~ U[0, 1), which has that probability and runs 3x faster than
    torch.bernoulli on the CPU.
    """
    u = torch.rand(x.shape, generator=generator, device=x.device)
    return (u * 255 < x).float()


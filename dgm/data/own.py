"""Your own images: an IDX folder laid out like MNIST's, an ``.npz`` file, or a PNG folder.

``--dataset`` takes a path wherever it does not name a built-in data set. Every source
gives what the built-in ones give: uint8 images (N, C, H, W) with C = 1 (grey) or 3
(RGB), and int64 labels (N,), which are -1 throughout where the source has none (so
that no one mistakes them for a class). The ``train`` and ``test`` splits are:

- IDX folder: ``train-images-idx3-ubyte[.gz]`` and ``t10k-images-idx3-ubyte[.gz]``
  (uint8, (N, H, W) or (N, H, W, C)); ``train-labels-idx1-ubyte[.gz]`` and
  ``t10k-labels-idx1-ubyte[.gz]`` are optional.
- ``.npz`` file: ``x_train`` and ``x_test`` (uint8, (N, H, W) or (N, H, W, C));
  ``y_train`` and ``y_test`` are optional.
- PNG folder: both name every ``*.png`` in the folder, sorted by file name, so slice
  them apart: ``train[:80%]``, ``train[80%:90%]``, ``test[90%:]``.

Each file's declared size is checked against its bytes before the images are
allocated, and every problem is one :class:`DgmError` that names the file.
"""

import os
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from dgm.data.idx import read_idx
from dgm.data.splits import parse_split, slice_of
from dgm.errors import DgmError

__all__ = ["load_own", "read_samples", "source_kind"]

_IDX_PREFIX = {"train": "train", "test": "t10k"}
_GREY, _COLOUR = {"L", "1"}, {"RGB", "P"}  # PIL modes read as grey or RGB


def source_kind(path: str | Path) -> str:
    """Which kind of source ``path`` is: "idx", "npz" or "png"; a one-line error if none."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".npz":
        return "npz"
    if p.is_dir():
        names = {f.name for f in p.iterdir()}
        if any(f"{s}-images-idx3-ubyte{gz}" in names for s in _IDX_PREFIX.values()
               for gz in ("", ".gz")):
            return "idx"
        if any(n.lower().endswith(".png") for n in names):
            return "png"
        raise DgmError(f"{p} holds neither IDX files (train-images-idx3-ubyte[.gz], "
                       "t10k-images-idx3-ubyte[.gz]) nor PNG files; give a folder of one kind")
    if p.exists():
        raise DgmError(f"{p} is neither an .npz file nor a folder of IDX or PNG files")
    raise DgmError(f"unknown data set {str(path)!r}: not mnist or fashion-mnist, and no such "
                   "file or folder; give one of those or a path to an IDX folder, an .npz file "
                   "or a PNG folder")


def load_own(path: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Load a (sliced) split of your own data: uint8 (N, C, H, W) and int64 labels (N,)."""
    base, start, stop = parse_split(split)
    kind = source_kind(path)
    st = os.stat(path)  # its modification time keys the caches
    if kind == "idx":
        images, labels = _idx_split(str(path), base)  # read_idx caches the files
    elif kind == "npz":
        images, labels = _npz_split(str(path), base, st.st_mtime_ns, st.st_size)
    else:
        images, labels = _png_folder(str(path), st.st_mtime_ns)
    s = slice_of(len(images), start, stop)
    x = torch.from_numpy(images[s].transpose(0, 3, 1, 2).copy())  # a C-ordered copy
    y = torch.from_numpy(labels[s].astype(np.int64))
    if len(x) == 0:
        raise DgmError(f"split {split!r} of {path} is empty ({len(images)} images in {base})")
    return x, y


def _nhwc(images: np.ndarray, where: str, floats: bool = False) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) uint8 (or, with ``floats``, floating-point) with C 1 or 3
    -> a (N, H, W, C) view."""
    if images.dtype != np.uint8 and not (floats and images.dtype.kind == "f"):
        raise DgmError(f"{where} holds {images.dtype} values; dgm reads 8-bit images (uint8)")
    if images.ndim == 3:
        return images[..., None]
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        return images
    raise DgmError(f"{where} holds an array of shape {images.shape}; expected images "
                   "(N, H, W) or (N, H, W, C) with C 1 (grey) or 3 (RGB)")


def _labels(labels: np.ndarray | None, n: int, where: str) -> np.ndarray:
    if labels is None:
        return np.full(n, -1, dtype=np.int64)
    if labels.ndim != 1 or len(labels) != n or labels.dtype.kind not in "iu":
        raise DgmError(f"{where} holds {labels.dtype} labels of shape {labels.shape}; expected "
                       f"{n} integer labels, one per image")
    return labels


def _idx_split(folder: str, base: str) -> tuple[np.ndarray, np.ndarray]:
    def find(stem: str) -> Path | None:
        return next((p for p in (Path(folder) / stem, Path(folder) / (stem + ".gz"))
                     if p.is_file()), None)

    prefix = _IDX_PREFIX[base]
    path = find(f"{prefix}-images-idx3-ubyte")
    if path is None:
        raise DgmError(f"{folder} has no {prefix}-images-idx3-ubyte[.gz] for the {base} split; "
                       "add it, or choose splits of the other file")
    images = _nhwc(read_idx(path), str(path))
    labels_path = find(f"{prefix}-labels-idx1-ubyte")
    labels = read_idx(labels_path) if labels_path else None
    return images, _labels(labels, len(images), str(labels_path))


def _npy_header(zf: zipfile.ZipFile, name: str, path: str) -> tuple[tuple, np.dtype]:
    """Shape and dtype of one array of an .npz, checked against its stored size."""
    info = zf.getinfo(name)
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise DgmError(f"{path}: {name} is in .npy format {version}; save it with numpy's "
                           "np.savez")
        shape, _, dtype = read(f)
        body = info.file_size - f.tell()
    if dtype.hasobject:
        raise DgmError(f"{path}: {name} holds Python objects; save plain uint8 arrays")
    expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if expected != body:
        raise DgmError(f"{path} is corrupt: {name} declares {shape} {dtype} ({expected} bytes) "
                       f"but holds {body} bytes")
    return shape, dtype


@lru_cache(maxsize=4)
def _npz_split(path: str, base: str, mtime_ns: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if f"x_{base}.npy" not in names:
                raise DgmError(f"{path} has no array x_{base} for the {base} split; it holds: "
                               f"{', '.join(sorted(n.removesuffix('.npy') for n in names))}")
            arrays = {}
            for key in (f"x_{base}", f"y_{base}"):
                if key + ".npy" not in names:
                    continue
                shape, dtype = _npy_header(zf, key + ".npy", path)
                if key.startswith("x") and dtype != np.uint8:
                    raise DgmError(f"{path}: {key} holds {dtype} values; dgm reads 8-bit images "
                                   "(uint8)")
                with zf.open(key + ".npy") as f:
                    arrays[key] = np.lib.format.read_array(f, allow_pickle=False)
                arrays[key].setflags(write=False)  # cached: no caller may change it
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        raise DgmError(f"{path} is not a readable .npz file ({e}); save it again with "
                       "numpy's np.savez") from None
    images = _nhwc(arrays[f"x_{base}"], f"{path}: x_{base}")
    return images, _labels(arrays.get(f"y_{base}"), len(images), f"{path}: y_{base}")


@lru_cache(maxsize=2)
def _png_folder(folder: str, mtime_ns: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() == ".png")
    errors = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
    # First every header (cheap: PIL decodes lazily), so that a mismatch is found before
    # the images are allocated and decoded.
    first = None
    for p in files:
        try:
            with Image.open(p) as im:
                mode, size = im.mode, im.size
        except errors as e:
            raise DgmError(f"cannot read {p} as a PNG image ({e})") from None
        if mode not in _GREY | _COLOUR:
            raise DgmError(f"{p} has PIL mode {mode}; dgm reads 8-bit grey (L) or RGB PNGs, "
                           "so convert it")
        kind = (mode in _COLOUR, size)
        if first is None:
            first = (p, kind)
        elif kind != first[1]:
            def say(k):
                return f"{k[1][0]}x{k[1][1]} {'RGB' if k[0] else 'grey'}"
            raise DgmError(f"{p} is {say(kind)} but {first[0].name} is {say(first[1])}; "
                           "every image of a PNG folder must have one size and colour mode")
    colour, (w, h) = first[1]
    images = np.empty((len(files), h, w, 3 if colour else 1), dtype=np.uint8)
    for i, p in enumerate(files):
        try:
            with Image.open(p) as im:
                images[i] = np.asarray(im.convert("RGB" if colour else "L")).reshape(h, w, -1)
        except errors as e:
            raise DgmError(f"cannot decode {p} ({e}); the file is truncated or corrupt") from None
    images.setflags(write=False)  # cached: no caller may change it
    return images, np.full(len(files), -1, dtype=np.int64)


def read_samples(path: str | Path) -> torch.Tensor:
    """Generated images to score, from any model: an ``.npz`` file holding one array, uint8
    (N, H, W) or (N, H, W, C) or floats in [0, 1] of that shape, or a folder of PNGs (read
    as :func:`load_own` reads one) -> float32 (N, C, H, W) in [0, 1]."""
    p = Path(path)
    if p.is_dir():
        if source_kind(p) != "png":
            raise DgmError(f"{p} holds no PNG files; give a folder of PNGs or an .npz file")
        images, _ = _png_folder(str(p), os.stat(p).st_mtime_ns)
        return torch.from_numpy(images.transpose(0, 3, 1, 2) / np.float32(255))
    if not (p.is_file() and p.suffix.lower() == ".npz"):
        raise DgmError(f"{p} is neither an .npz file nor a folder of PNGs" if p.exists() else
                       f"no such file or folder: {p}")
    try:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
            if len(names) != 1:
                held = ", ".join(n.removesuffix(".npy") for n in names) or "nothing"
                raise DgmError(f"{p} holds {len(names)} arrays ({held}); save the samples "
                               "alone: np.savez(FILE, samples)")
            _, dtype = _npy_header(zf, names[0], str(p))
            if dtype != np.uint8 and dtype.kind != "f":
                raise DgmError(f"{p} holds {dtype} values; give uint8 images or floats in "
                               "[0, 1]")
            with zf.open(names[0]) as f:
                array = np.lib.format.read_array(f, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        raise DgmError(f"{p} is not a readable .npz file ({e}); save it again with "
                       "numpy's np.savez") from None
    where = f"{p}: {names[0].removesuffix('.npy')}"
    images = _nhwc(array, where, floats=True)
    if images.dtype == np.uint8:
        return torch.from_numpy(images.transpose(0, 3, 1, 2) / np.float32(255))
    if images.size and not (np.isfinite(images).all() and 0 <= images.min()
                            and images.max() <= 1):
        raise DgmError(f"{where} holds floats from {images.min():g} to {images.max():g}; "
                       "give floats in [0, 1] or uint8 images")
    return torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32))

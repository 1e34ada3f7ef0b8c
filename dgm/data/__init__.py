"""The data layer: the built-in data sets and your own images, read, checked and sliced.

A split is held whole as one uint8 tensor of shape (N, C, H, W); training takes batches
from it by index on the model's device, so no per-batch Python decoding happens.
One reader per format, imports running one way:

- :mod:`dgm.data.idx`: the IDX format;
- :mod:`dgm.data.splits`: split names (``test[:9000]``, ``train[:90%]``);
- :mod:`dgm.data.builtin`: MNIST and Fashion-MNIST (where to look, checksums, download);
- :mod:`dgm.data.own`: your own IDX folder, ``.npz`` file or PNG folder, and samples to
  score.
"""

from pathlib import Path

import torch

from dgm.data.builtin import (
    DATASETS,
    Dataset,
    IdxFile,
    default_cache_dir,
    download,
    find_file,
    load_builtin,
    search_dirs,
    verify,
)
from dgm.data.idx import read_idx
from dgm.data.own import load_own, read_samples, source_kind
from dgm.data.splits import parse_split, slice_of

__all__ = ["DATASETS", "Dataset", "IdxFile", "binarize", "default_cache_dir", "download",
           "find_file", "load_split", "parse_split", "read_idx", "read_samples", "search_dirs",
           "split_overlap", "verify"]


def load_split(dataset: str, split: str = "train", data_dir: str | Path | None = None,
               offline: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a (sliced) split as ``(images, labels)``: uint8 (N, C, H, W) and int64 (N,).

    ``dataset`` is a built-in name or a path to your own images (see :mod:`dgm.data.own`,
    whose labels are -1 where the source has none).
    """
    if dataset in DATASETS:
        return load_builtin(dataset, split, data_dir, offline)
    return load_own(dataset, split)


def split_overlap(dataset: str, a: str, b: str, data_dir: str | Path | None = None,
                  offline: bool = False) -> int:
    """How many images the splits ``a`` and ``b`` of ``dataset`` share (e.g. 'test[:9000]'
    and 'test[8000:]' share 1000). In a PNG folder 'train' and 'test' are the same images."""
    base_a, *bounds_a = parse_split(a)
    base_b, *bounds_b = parse_split(b)
    if base_a != base_b:
        if dataset in DATASETS or source_kind(dataset) != "png":
            return 0
    n = len(load_split(dataset, base_a, data_dir, offline)[0])
    ra, rb = range(n)[slice_of(n, *bounds_a)], range(n)[slice_of(n, *bounds_b)]
    return max(0, min(ra.stop, rb.stop) - max(ra.start, rb.start)) if ra and rb else 0


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample Bernoulli(intensity / 255) pixels: uint8 -> float {0, 1} of the same shape.

    As 255 u < x with u ~ U[0, 1), which has that probability and runs 3x faster than
    torch.bernoulli on the CPU.
    """
    u = torch.rand(x.shape, generator=generator, device=x.device)
    return (u * 255 < x).float()

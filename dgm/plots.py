"""Pictures from arrays and run-folder metrics; never imports a model."""

import io
import math
from pathlib import Path

import numpy as np
import torch

from dgm.runs import atomic_write

__all__ = ["image_grid", "plot_compare", "plot_curves", "save_grid"]


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) images in [0, 1] into one uint8 array (rows, cols[, C]) with padding."""
    images = images.detach().float().cpu().clamp(0, 1)
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    grid = torch.ones(c, pad + ncol * (h + pad), pad + nrow * (w + pad))
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = images[i]
    array = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return array[..., 0] if c == 1 else array


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None,
              scale: int = 2) -> Path:
    """Save images as a PNG grid, each pixel drawn as a scale x scale block."""
    from PIL import Image

    array = image_grid(images, nrow)
    img = Image.fromarray(array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    _write_atomic(path, buf.getvalue())
    return path


def plot_curves(rows: list[dict], panels: dict[str, list[str]], path: str | Path,
                title: str = "") -> Path:
    """One panel per entry of ``panels`` (title -> metric columns), each against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (panel, columns) in zip(axes[0], panels.items(), strict=True):
        for col in columns:
            pts = [(r["epoch"], r[col]) for r in rows if r.get(col) is not None]
            if pts:
                x, y = zip(*pts, strict=True)
                ax.plot(x, y, marker="o" if len(pts) < 30 else None, ms=3,
                        label=col.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(panel)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _write_atomic(Path(path), buf.getvalue())
    return Path(path)


def plot_compare(series: dict[str, list[dict]], path: str | Path) -> Path:
    """Several runs' metrics (label -> metrics rows), one panel per metric, a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skip = {"epoch", "step", "time_s"}
    metrics = list(dict.fromkeys(k for rows in series.values() for r in rows for k in r
                                 if k not in skip))
    if not metrics:
        metrics = ["time_s"]
    ncol = min(3, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.4 * nrow), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for label, rows in series.items():
            pts = [(r["epoch"], r[metric]) for r in rows if r.get(metric) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=label)
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    _write_atomic(Path(path), buf.getvalue())
    return Path(path)


def _write_atomic(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))

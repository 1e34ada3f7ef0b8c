"""Pictures from arrays, models' samples and run-folder metrics; never imports a model."""

import io
import math
from pathlib import Path

import numpy as np
import torch

from dgm.runs import PNG_MARK, atomic_write

__all__ = ["epoch_pictures", "image_grid", "plot_compare", "plot_curves", "save_grid"]


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
    from PIL.PngImagePlugin import PngInfo

    array = image_grid(images, nrow)
    img = Image.fromarray(array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    info = PngInfo()
    info.add_text(*PNG_MARK)
    img.save(buf, format="PNG", pnginfo=info)
    _write_atomic(path, buf.getvalue())
    return path


def plot_curves(rows: list[dict], panels: dict[str, list[str]], path: str | Path,
                title: str = "") -> Path:
    """One panel per entry of ``panels`` (title -> metric columns), each against epoch."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (panel, columns) in zip(axes[0], panels.items(), strict=True):
        for col in columns:
            _plot_metric(ax, rows, col, col.replace("_", " "))
        _style(ax, panel)
    if title:
        fig.suptitle(title)
    return _save(fig, path, dpi=110)


def plot_compare(series: dict[str, list[dict]]) -> bytes:
    """Several runs' metrics (label -> metrics rows), one panel per metric, a line per run;
    returned as PNG bytes, for a page that embeds it (nothing is written beside the page)."""
    plt = pyplot()
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
            _plot_metric(ax, rows, metric, label)
        _style(ax, metric.replace("_", " "))
    for ax in axes.flat[len(metrics):]:
        ax.axis("off")
    return _png_bytes(fig, dpi=100)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (imported on first use: it is slow)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _plot_metric(ax, rows: list[dict], column: str, label: str) -> None:
    pts = [(r["epoch"], r[column]) for r in rows if r.get(column) is not None]
    if pts:
        ax.plot(*zip(*pts, strict=True), marker="o" if len(pts) < 30 else None, ms=3,
                label=label)


def _style(ax, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _png_bytes(fig, dpi: int) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata=dict([PNG_MARK]))
    pyplot().close(fig)
    return buf.getvalue()


def _save(fig, path: str | Path, dpi: int) -> Path:
    _write_atomic(Path(path), _png_bytes(fig, dpi))
    return Path(path)


def _write_atomic(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def epoch_pictures(model, cfg, run: Path, epoch: int, final: bool = False) -> torch.Tensor | None:
    """Sample grids (fixed noise, so epochs are comparable) and, where asked, the manifold.

    Returns the samples drawn, or None.
    """
    model.eval()
    samples = None
    final = final or epoch == cfg.epochs
    if epoch in cfg.sample_epochs or final:
        gen = torch.Generator(next(model.parameters()).device).manual_seed(cfg.seed)
        samples = model.sample(cfg.num_samples, generator=gen)
        save_grid(samples, run / "samples" / f"epoch_{epoch:03d}.png")
    if getattr(model, "latent_dim", None) == 2 and hasattr(model, "manifold") and (
            epoch in getattr(cfg, "manifold_epochs", ()) or final):
        n = cfg.manifold_size
        save_grid(model.manifold(n), run / "manifold" / f"epoch_{epoch:03d}.png", nrow=n, scale=1)
    return samples

"""What the trainer asks of a model: the built-in ones and your own alike.

A model is a ``torch.nn.Module`` (the trainer moves it to the device, saves its
``state_dict`` and switches ``train()`` / ``eval()``) with the members below. Your own
class, named by import path (``dgm train --model mypkg.module:MyModel``), gets the run
folder, resume, pictures, the report and ``dgm evaluate --sample-quality`` through them.
"""

from typing import Protocol, runtime_checkable

import torch

__all__ = ["GenerativeModel", "REQUIRED"]

# The members checked when your own model is imported (the optional ones are not).
REQUIRED = ("from_config", "prepare", "configure_optimizers", "training_step",
            "validation_step", "sample", "curves", "best_metric")


@runtime_checkable
class GenerativeModel(Protocol):
    """The trainer's side of a model.

    Optional members: ``initialize(x)`` (data-dependent initialisation from one prepared
    batch, before the first epoch); ``latent_dim`` with ``manifold(n)`` (``dgm manifold``,
    drawn when latent_dim is 2); ``generate(z)`` with ``latent_dim`` or ``latent_shape``
    (``dgm interpolate``); ``refresh_statistics(generator)`` (called on the moving average
    of the weights with ``--ema`` after each epoch, before validation, pictures and the
    checkpoint: recompute what depends on the weights, such as BatchNorm running
    statistics, which averaging does not keep consistent). Your own class may carry a
    ``Config``: a dataclass that subclasses :class:`dgm.config.TrainConfig` with its own
    options (int, float, bool, str, list[int], each optionally None), which become flags
    and YAML keys; without one
    the model gets the base options.
    """

    #: Title of each panel of ``curves.png`` -> the metric columns it plots.
    curves: dict[str, list[str]]
    #: The metric that picks ``checkpoints/best.pt`` and whether lower or higher is better,
    #: e.g. ``("val_loss", "min")``.
    best_metric: tuple[str, str]

    @classmethod
    def from_config(cls, cfg, image_shape: tuple[int, int, int]) -> "GenerativeModel":
        """A fresh model for images of ``image_shape`` (C, H, W), from the run's config."""

    def prepare(self, x: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 images (B, C, H, W) -> the model's input (binarised, dequantised, scaled).

        Called on every training batch (with the trainer's generator, for random
        transforms) and once on the validation images.
        """

    def configure_optimizers(self, cfg) -> dict[str, torch.optim.Optimizer]:
        """The optimisers by name; the trainer saves and restores their states."""

    def training_step(self, x: torch.Tensor,
                      optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, torch.Tensor]:
        """One update on a prepared batch x (B, ...); returns scalar metrics (averaged over
        the epoch into ``metrics.csv``; a non-finite one stops training)."""

    def validation_step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scalar metrics of a prepared validation batch, under ``torch.no_grad``; averaged
        over the validation split, weighted by batch size."""

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images (n, C, H, W) in [0, 1], drawn with ``generator`` (fixed noise makes the
        sample grids of different epochs comparable)."""

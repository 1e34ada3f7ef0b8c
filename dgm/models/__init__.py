"""The built-in models and the registry that names them.

Each model owns its update rule (``prepare``, ``configure_optimizers``,
``training_step``, ``validation_step``) and its pictures (``sample``); the trainer in
:mod:`dgm.train` owns everything around it.
"""

from torch import nn

from dgm.errors import DgmError
from dgm.models.flow import RealNVP
from dgm.models.gan import GAN
from dgm.models.vae import VAE

__all__ = ["GAN", "MODELS", "VAE", "RealNVP", "build_model"]

MODELS: dict[str, type[nn.Module]] = {"vae": VAE, "gan": GAN, "flow": RealNVP}


def build_model(name: str, cfg, image_shape: tuple[int, int, int] = (1, 28, 28)) -> nn.Module:
    """A fresh model named ``name`` ("vae", "gan", "flow") for images of ``image_shape``
    (C, H, W), from a :class:`dgm.config.TrainConfig`."""
    if name not in MODELS:
        raise DgmError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name].from_config(cfg, tuple(image_shape))

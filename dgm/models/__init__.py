"""The built-in models, the registry that names them, and your own model by import path.

Each model owns its update rule (``prepare``, ``configure_optimizers``,
``training_step``, ``validation_step``) and its pictures (``sample``); the trainer in
:mod:`dgm.train` owns everything around it. :class:`GenerativeModel` writes that
contract down.
"""

import importlib
import os
import sys

from torch import nn

from dgm.errors import DgmError
from dgm.models.diffusion import Diffusion
from dgm.models.flow import RealNVP
from dgm.models.gan import GAN
from dgm.models.protocol import REQUIRED, GenerativeModel
from dgm.models.vae import VAE

__all__ = ["GAN", "MODELS", "VAE", "Diffusion", "GenerativeModel", "RealNVP", "build_model",
           "model_class"]

MODELS: dict[str, type[nn.Module]] = {"vae": VAE, "gan": GAN, "flow": RealNVP,
                                      "diffusion": Diffusion}


def model_class(name: str) -> type[nn.Module]:
    """The class that ``name`` stands for: a built-in ("vae", "gan", "flow", "diffusion") or your
    own, named by import path "package.module:ClassName" (imported from PYTHONPATH or the
    current folder)."""
    if name in MODELS:
        return MODELS[name]
    module_name, _, attr = name.partition(":")
    if not module_name or not attr.isidentifier():
        raise DgmError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}, or name "
                       "your own by import path, e.g. --model mypkg.module:MyModel")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # as "python -m" does, so ./mymodel.py is found
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any failure of the user's module is one line, not a traceback
        raise DgmError(f"cannot import {module_name} for model {name}: {type(e).__name__}: "
                       f"{e}; is it on PYTHONPATH or in the current folder?") from None
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise DgmError(f"{module_name} has no class {attr} (model {name})")
    missing = [m for m in REQUIRED if not hasattr(cls, m)]
    if missing or not issubclass(cls, nn.Module):
        what = ", ".join(missing) if missing else "torch.nn.Module as its base"
        raise DgmError(f"{name} is not a dgm model: it lacks {what} "
                       "(see dgm.models.GenerativeModel)")
    return cls


def build_model(name: str, cfg, image_shape: tuple[int, int, int] = (1, 28, 28)) -> nn.Module:
    """A fresh model named ``name`` (see :func:`model_class`) for images of ``image_shape``
    (C, H, W), from a :class:`dgm.config.TrainConfig`."""
    return model_class(name).from_config(cfg, tuple(image_shape))

"""dgm: deep generative models on small image data (VAE, GAN, RealNVP)."""

from dgm.flow import RealNVP
from dgm.vae import VAE

__all__ = ["VAE", "RealNVP"]
__version__ = "0.1.0"

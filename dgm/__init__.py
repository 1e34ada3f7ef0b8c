"""dgm: deep generative models on small image data (VAE, GAN, RealNVP)."""

from dgm.flow import RealNVP
from dgm.gan import GAN
from dgm.vae import VAE

__all__ = ["GAN", "RealNVP", "VAE"]
__version__ = "0.1.0"

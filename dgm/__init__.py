"""dgm: deep generative models on small image data (VAE, GAN, RealNVP)."""

from dgm.models import GAN, VAE, RealNVP

__all__ = ["GAN", "RealNVP", "VAE"]
__version__ = "0.1.0"

"""dgm: deep generative models on small image data (VAE, GAN, RealNVP, diffusion)."""

__all__ = ["GAN", "VAE", "Diffusion", "RealNVP", "load"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The models import torch (about 2 s); the command line imports this package first and
    # must answer --help, and be interruptible, before that.
    if name == "load":
        from dgm.evaluate import load

        return load
    if name in __all__:
        import dgm.models

        return getattr(dgm.models, name)
    raise AttributeError(f"module 'dgm' has no attribute {name!r}")

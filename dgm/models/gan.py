"""Generative adversarial network with MLPs (Goodfellow et al., 2014; report section 2).

Generator z (100, N(0, I)) -> 128 -> 256 -> 512 -> 1024 -> 784 (tanh), LeakyReLU(0.2)
after each hidden layer and BatchNorm on the three widening ones; discriminator
784 -> 512 -> 256 -> 1 logit with LeakyReLU(0.2) and dropout 0.3. Images live in
[-1, 1] inside the model and come out of ``generate`` / ``sample`` in [0, 1]. Other
image shapes (C, H, W) take and give C*H*W in place of 784.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from dgm.optim import adam

__all__ = ["GAN", "Discriminator", "Generator", "discriminator_loss", "generator_loss"]


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """-log D(x) - log(1 - D(G(z))) from logits (report eq. 43), averaged: (B,), (B,) -> ().

    -log sigmoid(l) = softplus(-l) and -log(1 - sigmoid(l)) = softplus(l), which stay
    finite where sigmoid saturates.
    """
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(fake_logits: torch.Tensor, saturating: bool = False) -> torch.Tensor:
    """The generator's loss from D's logits on fakes, averaged: (B,) -> ().

    Non-saturating (default, report eq. 44): -log D(G(z)), whose gradient w.r.t. the logit
    is -(1 - D(G(z))), close to -1 exactly when D confidently rejects the fakes. The
    saturating minimax form log(1 - D(G(z))) has gradient -D(G(z)), which vanishes there
    (report 2.4); it is kept for comparison and tests.
    """
    if saturating:
        return -F.softplus(fake_logits).mean()
    return F.softplus(-fake_logits).mean()


class Generator(nn.Module):
    """z (B, latent_dim) -> images in [-1, 1] flattened, (B, data_dim)."""

    def __init__(self, latent_dim: int = 100, hidden_dims: tuple[int, ...] = (128, 256, 512, 1024),
                 data_dim: int = 784):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(latent_dim, hidden_dims[0]), nn.LeakyReLU(0.2)]
        for d_in, d_out in zip(hidden_dims[:-1], hidden_dims[1:], strict=True):
            # BatchNorm only on the widening layers, as in the report; the first layer has none.
            layers += [nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.LeakyReLU(0.2)]
        layers += [nn.Linear(hidden_dims[-1], data_dim), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    """Images (B, ...) in [-1, 1] -> one logit of "real" per image, (B,)."""

    def __init__(self, data_dim: int = 784, hidden_dims: tuple[int, ...] = (512, 256),
                 dropout: float = 0.3):
        super().__init__()
        layers: list[nn.Module] = []
        for d_in, d_out in zip((data_dim, *hidden_dims[:-1]), hidden_dims, strict=True):
            layers += [nn.Linear(d_in, d_out), nn.LeakyReLU(0.2), nn.Dropout(dropout)]
        layers.append(nn.Linear(hidden_dims[-1], 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1)).squeeze(1).float()  # fp32 logits for the losses


class GAN(nn.Module):
    """The report's GAN: a generator, a discriminator and their alternating updates.

    Arguments:
        latent_dim: size of the noise z ~ N(0, I) (100 in the report).
        image_shape: (C, H, W) of the data.

    Example:
        >>> gan = GAN()
        >>> gan.generate(torch.randn(3, gan.latent_dim)).shape
        torch.Size([3, 1, 28, 28])
        >>> gan.discriminate(torch.rand(5, 1, 28, 28) * 2 - 1).shape
        torch.Size([5])
    """

    name = "gan"
    curves = {
        "Losses (Figure 5)": ["d_loss", "g_loss", "val_d_loss"],
        "Discriminator outputs": ["d_real", "d_fake", "val_d_real", "val_d_fake"],
    }
    # GAN losses say little about sample quality, so no epoch is "best" by them: the
    # best checkpoint is the last one; `dgm evaluate` gives the Frechet score instead.
    best_metric = ("epoch", "max")

    def __init__(self, latent_dim: int = 100, image_shape: tuple[int, int, int] = (1, 28, 28)):
        super().__init__()
        self.latent_dim = latent_dim
        self.image_shape = tuple(image_shape)
        data_dim = math.prod(image_shape)
        self.generator = Generator(latent_dim, data_dim=data_dim)
        self.discriminator = Discriminator(data_dim)

    @classmethod
    def from_config(cls, cfg, image_shape: tuple[int, int, int] = (1, 28, 28)) -> "GAN":
        return cls(cfg.latent_dim, image_shape)

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from noise: (B, latent_dim) -> (B, C, H, W). Differentiable."""
        return ((self.generator(z) + 1) / 2).view(len(z), *self.image_shape)

    def discriminate(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of "real" for images in [-1, 1] (as ``prepare`` makes them): (B, ...) -> (B,)."""
        return self.discriminator(x)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images in [0, 1] from z ~ N(0, I): (n, C, H, W)."""
        device = next(self.parameters()).device
        return self.generate(torch.randn(n, self.latent_dim, generator=generator, device=device))

    # The trainer's interface.

    @staticmethod
    def prepare(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 images -> floats in [-1, 1], the range of the generator's tanh."""
        return x.float() / 127.5 - 1

    def configure_optimizers(self, cfg) -> dict[str, torch.optim.Optimizer]:
        betas = (cfg.beta1, cfg.beta2)
        return {"generator": adam(self.generator.parameters(), cfg.lr, betas),
                "discriminator": adam(self.discriminator.parameters(), cfg.lr, betas)}

    def training_step(self, x: torch.Tensor, optimizers: dict) -> dict[str, torch.Tensor]:
        """One discriminator update, then one generator update, each with fresh noise.

        x: (B, C, H, W) real images in [-1, 1]. Returns the two losses and the mean
        probabilities D(x) and D(G(z)) seen by the discriminator's update.
        """
        b = len(x)
        z = torch.randn(b, self.latent_dim, device=x.device)
        with torch.no_grad():  # D's update needs no gradient through G
            fake = self.generator(z)
        real_logits, fake_logits = self.discriminator(x), self.discriminator(fake)
        d_loss = discriminator_loss(real_logits, fake_logits)
        opt_d = optimizers["discriminator"]
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()

        # D's parameters need no gradient for G's update; freezing them saves that work.
        self.discriminator.requires_grad_(False)
        try:
            z = torch.randn(b, self.latent_dim, device=x.device)
            g_loss = generator_loss(self.discriminator(self.generator(z)))
            opt_g = optimizers["generator"]
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
        finally:
            self.discriminator.requires_grad_(True)
        return {"d_loss": d_loss.detach(), "g_loss": g_loss.detach(),
                "d_real": torch.sigmoid(real_logits.detach()).mean(),
                "d_fake": torch.sigmoid(fake_logits.detach()).mean()}

    @torch.no_grad()
    def validation_step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """D (in eval mode) on held-out real images against as many fresh fakes.

        ``val_d_acc`` near 0.5 means D cannot tell them apart; near 1 that it can.
        """
        z = torch.randn(len(x), self.latent_dim, device=x.device)
        real_logits = self.discriminator(x)
        fake_logits = self.discriminator(self.generator(z))
        acc = ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean()) / 2
        return {"val_d_loss": discriminator_loss(real_logits, fake_logits),
                "val_d_acc": acc,
                "val_d_real": torch.sigmoid(real_logits).mean(),
                "val_d_fake": torch.sigmoid(fake_logits).mean()}

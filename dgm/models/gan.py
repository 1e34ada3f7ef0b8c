"""Generative adversarial network with MLPs (Goodfellow et al., 2014; report section 2).

Generator z (100, N(0, I)) -> 128 -> 256 -> 512 -> 1024 -> 784 (tanh), LeakyReLU(0.2)
after each hidden layer and BatchNorm on the three widening ones; discriminator
784 -> 512 -> 256 -> 1 logit with LeakyReLU(0.2) and dropout 0.3. Images live in
[-1, 1] inside the model and come out of ``generate`` / ``sample`` in [0, 1]. Other
image shapes (C, H, W) take and give C*H*W in place of 784.

Beyond the report (each an option, the report's model the default): DCGAN-style conv
networks (:mod:`dgm.models.conv_gan`), the hinge and WGAN-GP losses, spectral
normalisation of the discriminator, the R1 penalty and several discriminator updates per
generator update.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from dgm.errors import DgmError
from dgm.models.conv_gan import ConvDiscriminator, ConvGenerator, apply_spectral_norm
from dgm.optim import adam

__all__ = ["GAN", "LOSSES", "Discriminator", "Generator", "discriminator_loss",
           "generator_loss", "gradient_penalty", "r1_penalty", "random_interpolates"]

LOSSES = ("ns", "hinge", "wgan-gp")


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor,
                       loss: str = "ns") -> torch.Tensor:
    """The discriminator's loss from its outputs on real and fake images, averaged:
    (B,), (B,) -> ().

    ns: -log D(x) - log(1 - D(G(z))) from logits (report eq. 43); -log sigmoid(l) =
    softplus(-l) and -log(1 - sigmoid(l)) = softplus(l) stay finite where sigmoid saturates.
    hinge: E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(z)))] (Miyato et al., 2018, eq. 16).
    wgan-gp: the critic's E[D(G(z))] - E[D(x)], the negated Wasserstein estimate (Gulrajani et
    al., 2017, Algorithm 1, without the penalty: see :func:`gradient_penalty`).
    """
    if loss == "ns":
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    if loss == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    if loss == "wgan-gp":
        return fake_logits.mean() - real_logits.mean()
    raise ValueError(f"unknown GAN loss {loss!r}; choose one of {', '.join(LOSSES)}")


def generator_loss(fake_logits: torch.Tensor, saturating: bool = False,
                   loss: str = "ns") -> torch.Tensor:
    """The generator's loss from D's outputs on fakes, averaged: (B,) -> ().

    Non-saturating (ns, default, report eq. 44): -log D(G(z)), whose gradient w.r.t. the
    logit is -(1 - D(G(z))), close to -1 exactly when D confidently rejects the fakes. The
    saturating minimax form log(1 - D(G(z))) has gradient -D(G(z)), which vanishes there
    (report 2.4); it is kept for comparison and tests. hinge and wgan-gp: -E[D(G(z))].
    """
    if loss in ("hinge", "wgan-gp"):
        return -fake_logits.mean()
    if loss != "ns":
        raise ValueError(f"unknown GAN loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if saturating:
        return -F.softplus(fake_logits).mean()
    return F.softplus(-fake_logits).mean()


def random_interpolates(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Points eps x + (1 - eps) G(z) on the segment between each real/fake pair, with one
    eps ~ U(0, 1) per pair (WGAN-GP's sampling, Gulrajani et al., 2017, Algorithm 1):
    (B, ...), (B, ...) -> (B, ...)."""
    eps = torch.rand(len(real), *([1] * (real.dim() - 1)), device=real.device)  # (B, 1, 1, 1)
    return eps * real + (1 - eps) * fake


def _input_gradient(critic, x: torch.Tensor) -> torch.Tensor:
    """d sum_i D(x_i) / dx, kept in the graph so that a penalty on it trains D: (B, ...)."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    return grad


def gradient_penalty(critic, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP's penalty E[(||grad D(x_hat)||_2 - 1)^2] at :func:`random_interpolates` x_hat:
    (B, ...), (B, ...) -> () (to be weighted by lambda, 10 in the paper)."""
    grad = _input_gradient(critic, random_interpolates(real, fake.detach()))
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


def r1_penalty(critic, real: torch.Tensor) -> torch.Tensor:
    """E[||grad D(x)||^2] on real images (Mescheder et al., 2018, eq. 9; weighted by gamma/2):
    (B, ...) -> ()."""
    return _input_gradient(critic, real).flatten(1).square().sum(1).mean()


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
        return self.net(x.flatten(1)).squeeze(1).to(x.dtype)  # fp32 logits under bf16


class GAN(nn.Module):
    """The report's GAN, or a convolutional one: a generator, a discriminator and their
    alternating updates.

    Arguments:
        latent_dim: size of the noise z ~ N(0, I) (100 in the report).
        image_shape: (C, H, W) of the data.
        arch: "mlp" (the report's networks) or "conv" (:mod:`dgm.models.conv_gan`).
        hidden_dim: base channels of the conv networks (64 if None); not for "mlp".
        d_hidden_dim: base channels of the conv discriminator alone (hidden_dim if None).
        num_blocks: extra 3x3 convolutions at each resolution of both conv networks.
        loss: "ns", "hinge" or "wgan-gp" (see :func:`discriminator_loss`).
        gp_weight: lambda of WGAN-GP's :func:`gradient_penalty`.
        spectral_norm: spectral normalisation of every discriminator layer.
        r1_weight: gamma of the :func:`r1_penalty` (0 = off).
        d_steps: discriminator updates per generator update.
        minibatch_std: the conv discriminator's minibatch standard deviation channel.
        temperature: standard deviation of z in ``sample`` (below 1: the truncation trick of
            Brock et al., 2019, in its simple scaled form; training always uses N(0, I)).

    Example:
        >>> gan = GAN()
        >>> gan.generate(torch.randn(3, gan.latent_dim)).shape
        torch.Size([3, 1, 28, 28])
        >>> gan.discriminate(torch.rand(5, 1, 28, 28) * 2 - 1).shape
        torch.Size([5])
        >>> GAN(arch="conv", image_shape=(3, 32, 32)).generate(torch.randn(2, 100)).shape
        torch.Size([2, 3, 32, 32])
    """

    name = "gan"
    # GAN losses say little about sample quality, so no epoch is "best" by them: the
    # best checkpoint is the last one; `dgm evaluate` gives the Frechet score instead.
    best_metric = ("epoch", "max")

    def __init__(self, latent_dim: int = 100, image_shape: tuple[int, int, int] = (1, 28, 28),
                 arch: str = "mlp", hidden_dim: int | None = None, loss: str = "ns",
                 gp_weight: float = 10.0, spectral_norm: bool = False, r1_weight: float = 0.0,
                 d_steps: int = 1, d_hidden_dim: int | None = None, temperature: float = 1.0,
                 num_blocks: int = 0, minibatch_std: bool = False):
        super().__init__()
        if loss not in LOSSES:
            raise DgmError(f"unknown GAN loss {loss!r}; choose one of {', '.join(LOSSES)}")
        self.latent_dim, self.temperature = latent_dim, temperature
        self.image_shape = tuple(image_shape)
        self.loss, self.gp_weight, self.r1_weight, self.d_steps = loss, gp_weight, r1_weight, \
            d_steps
        if arch == "mlp":
            for flag, value in (("--hidden-dim", hidden_dim), ("--d-hidden-dim", d_hidden_dim),
                                ("--num-blocks", num_blocks or None),
                                ("--minibatch-std", minibatch_std or None)):
                if value is not None:
                    raise DgmError(f"{flag} shapes the conv arch's networks; the mlp arch has "
                                   "the report's widths: leave it out or give --arch conv")
            data_dim = math.prod(image_shape)
            self.generator = Generator(latent_dim, data_dim=data_dim)
            self.discriminator = Discriminator(data_dim)
        elif arch == "conv":
            self.generator = ConvGenerator(latent_dim, self.image_shape, hidden_dim or 64,
                                           num_blocks)
            self.discriminator = ConvDiscriminator(self.image_shape,
                                                   d_hidden_dim or hidden_dim or 64, num_blocks,
                                                   minibatch_std)
        else:
            raise DgmError(f"unknown GAN arch {arch!r}; choose mlp or conv")
        if spectral_norm:
            apply_spectral_norm(self.discriminator)
        # D's outputs are probabilities only under the logistic (ns) loss; else raw scores.
        outputs = "D(x) as probabilities" if loss == "ns" else "D(x) as scores"
        self.curves = {
            "Losses (Figure 5)": ["d_loss", "g_loss", "val_d_loss"],
            f"Discriminator outputs ({outputs})": ["d_real", "d_fake", "val_d_real",
                                                   "val_d_fake"],
        }
        penalties = [k for k, on in (("gp", loss == "wgan-gp"), ("r1", r1_weight > 0)) if on]
        if penalties:
            self.curves["Gradient penalties (unweighted)"] = penalties

    @classmethod
    def from_config(cls, cfg, image_shape: tuple[int, int, int] = (1, 28, 28)) -> "GAN":
        return cls(cfg.latent_dim, image_shape, arch=cfg.arch, hidden_dim=cfg.hidden_dim,
                   loss=cfg.loss, gp_weight=cfg.gp_weight, spectral_norm=cfg.spectral_norm,
                   r1_weight=cfg.r1_weight, d_steps=cfg.d_steps, d_hidden_dim=cfg.d_hidden_dim,
                   temperature=cfg.temperature, num_blocks=cfg.num_blocks,
                   minibatch_std=cfg.minibatch_std)

    def _fake(self, z: torch.Tensor) -> torch.Tensor:
        """Generated images in [-1, 1], shaped as the data: (B, latent_dim) -> (B, C, H, W)."""
        return self.generator(z).view(len(z), *self.image_shape)

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from noise: (B, latent_dim) -> (B, C, H, W). Differentiable."""
        return (self._fake(z) + 1) / 2

    def discriminate(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of "real" for images in [-1, 1] (as ``prepare`` makes them): (B, ...) -> (B,)."""
        return self.discriminator(x)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images in [0, 1] from z ~ N(0, temperature^2 I): (n, C, H, W)."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, generator=generator, device=device)
        return self.generate(self.temperature * z)

    @torch.no_grad()
    def refresh_statistics(self, generator: torch.Generator | None = None, n: int = 5000,
                           batch_size: int = 500) -> None:
        """Recompute the generator's BatchNorm running statistics for its current weights, from
        n fresh z (as ``torch.optim.swa_utils.update_bn`` does from data).

        The trainer calls it on the moving average of the weights (``--ema``): averaged
        running statistics are the average of statistics of past weights, not the statistics
        of the averaged weights, which are what sampling in eval mode needs.
        """
        norms = [m for m in self.generator.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return
        was_training, momenta = self.generator.training, [m.momentum for m in norms]
        device = next(self.parameters()).device
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
        self.generator.train()
        try:
            for _ in range(max(n // batch_size, 1)):
                self.generator(torch.randn(batch_size, self.latent_dim, generator=generator,
                                           device=device))
        finally:
            for m, momentum in zip(norms, momenta, strict=True):
                m.momentum = momentum
            self.generator.train(was_training)

    # The trainer's interface.

    @staticmethod
    def prepare(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 images -> floats in [-1, 1], the range of the generator's tanh."""
        return x.float() / 127.5 - 1

    def configure_optimizers(self, cfg) -> dict[str, torch.optim.Optimizer]:
        betas = (cfg.beta1, cfg.beta2)
        return {"generator": adam(self.generator.parameters(), cfg.lr, betas),
                "discriminator": adam(self.discriminator.parameters(),
                                      cfg.lr if cfg.d_lr is None else cfg.d_lr, betas)}

    def _discriminator_step(self, x: torch.Tensor, opt_d) -> dict[str, torch.Tensor]:
        """One update of D on real images x (B, C, H, W) and as many fresh fakes."""
        z = torch.randn(len(x), self.latent_dim, device=x.device)
        with torch.no_grad():  # D's update needs no gradient through G
            fake = self._fake(z)
        real_logits, fake_logits = self.discriminator(x), self.discriminator(fake)
        d_loss = discriminator_loss(real_logits, fake_logits, self.loss)
        total = d_loss
        out = {"d_loss": d_loss.detach()}
        if self.loss == "wgan-gp":
            gp = gradient_penalty(self.discriminator, x, fake)
            total = total + self.gp_weight * gp
            out["gp"] = gp.detach()
        if self.r1_weight:
            r1 = r1_penalty(self.discriminator, x)
            total = total + self.r1_weight / 2 * r1
            out["r1"] = r1.detach()
        opt_d.zero_grad(set_to_none=True)
        total.backward()
        opt_d.step()
        if self.loss == "ns":
            out |= {"d_real": torch.sigmoid(real_logits.detach()).mean(),
                    "d_fake": torch.sigmoid(fake_logits.detach()).mean()}
        else:
            out |= {"d_real": real_logits.detach().mean(), "d_fake": fake_logits.detach().mean()}
        return out

    def training_step(self, x: torch.Tensor, optimizers: dict) -> dict[str, torch.Tensor]:
        """``d_steps`` discriminator updates, then one generator update, each with fresh noise.

        x: (B, C, H, W) real images in [-1, 1], which every discriminator update of the step
        sees. Returns the losses, any penalties (unweighted) and D's mean outputs on real and
        fake images (probabilities D(x) and D(G(z)) under ns, raw scores otherwise), averaged
        over the discriminator updates.
        """
        sums: dict[str, torch.Tensor] = {}
        for _ in range(self.d_steps):
            for k, v in self._discriminator_step(x, optimizers["discriminator"]).items():
                sums[k] = sums.get(k, 0) + v
        out = {k: v / self.d_steps for k, v in sums.items()}

        # D's parameters need no gradient for G's update; freezing them saves that work.
        self.discriminator.requires_grad_(False)
        try:
            z = torch.randn(len(x), self.latent_dim, device=x.device)
            g_loss = generator_loss(self.discriminator(self._fake(z)), loss=self.loss)
            opt_g = optimizers["generator"]
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()
        finally:
            self.discriminator.requires_grad_(True)
        return {"d_loss": out.pop("d_loss"), "g_loss": g_loss.detach(), **out}

    @torch.no_grad()
    def validation_step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """D (in eval mode) on held-out real images against as many fresh fakes.

        ``val_d_acc`` near 0.5 means D cannot tell them apart (scores above 0 read as
        "real"); near 1 that it can. ``val_d_loss`` is the adversarial loss without
        penalties.
        """
        z = torch.randn(len(x), self.latent_dim, device=x.device)
        real_logits = self.discriminator(x)
        fake_logits = self.discriminator(self._fake(z))
        acc = ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean()) / 2
        squash = torch.sigmoid if self.loss == "ns" else (lambda t: t)
        return {"val_d_loss": discriminator_loss(real_logits, fake_logits, self.loss),
                "val_d_acc": acc,
                "val_d_real": squash(real_logits).mean(),
                "val_d_fake": squash(fake_logits).mean()}

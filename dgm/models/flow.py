"""RealNVP: a normalizing flow of affine couplings (Dinh, Sohl-Dickstein & Bengio, 2017).

The flow maps a dequantised image through the logit pre-processing and a stack of
couplings (the transforms of :mod:`dgm.models.transforms`) to a standard normal latent;
log p(x) is the change-of-variables sum (report eq. 46).

Two architectures:

- ``conv`` (default): RealNVP's multi-scale design. Per scale, affine couplings with
  checkerboard masks, a squeeze (C, H, W) -> (4C, H/2, W/2), couplings with channel
  masks, then half the channels are factored out to the prior. Conditioners are small
  residual conv nets; ActNorm (Kingma & Dhariwal, 2018) precedes each coupling.
- ``mlp``: the report's variant, couplings with alternating checkerboard masks whose
  conditioners are MLPs on the flattened image.
"""

import math

import torch
from torch import nn

from dgm.errors import DgmError
from dgm.maths import (
    bits_per_dim,
    dequantize,
    dequantize_logdet,
    logit_inverse,
    logit_transform,
    std_normal_log_prob,
)
from dgm.models.dequantization import VariationalDequantizer
from dgm.models.transforms import (
    ActNorm,
    AffineCoupling,
    CompositeTransform,
    MultiscaleTransform,
    Shape,
    Squeeze,
    Transform,
)
from dgm.optim import adam

__all__ = ["RealNVP", "build_conv_flow", "build_mlp_flow"]


def build_conv_flow(shape: Shape, hidden_dim: int, num_blocks: int, num_couplings: int,
                    num_scales: int, actnorm: bool, scale_clamp: float) -> MultiscaleTransform:
    """RealNVP's multi-scale flow for (C, H, W) images, H and W even at every squeeze."""

    def couplings(shape: Shape, mask: str, n: int) -> list[Transform]:
        layers: list[Transform] = []
        for i in range(n):
            if actnorm:
                layers.append(ActNorm(shape[0]))
            layers.append(AffineCoupling(shape, mask, i % 2, "conv", hidden_dim, num_blocks,
                                         scale_clamp))
        return layers

    levels, out_shapes = [], []
    c, h, w = shape
    for _ in range(num_scales):
        if h % 2 or w % 2:
            raise ValueError(f"cannot squeeze {h}x{w} images; use fewer --num-scales")
        layers = couplings((c, h, w), "checkerboard", num_couplings) + [Squeeze()]
        c, h, w = 4 * c, h // 2, w // 2
        layers += couplings((c, h, w), "channel", num_couplings)
        levels.append(CompositeTransform(layers))
        out_shapes.append((c, h, w))
        c //= 2  # factored out
    levels.append(CompositeTransform(couplings((c, h, w), "checkerboard", num_couplings + 1)))
    out_shapes.append((c, h, w))
    return MultiscaleTransform(levels, out_shapes)


def build_mlp_flow(shape: Shape, hidden_dim: int, num_blocks: int, num_couplings: int,
                   actnorm: bool, scale_clamp: float) -> MultiscaleTransform:
    """The report's flow: 2 * num_couplings MLP couplings with alternating checkerboards.

    One level with nothing factored out, so that its latent is flat (B, C*H*W) like the
    conv arch's and sampling can invert a flat draw."""
    layers: list[Transform] = []
    for i in range(2 * num_couplings):
        if actnorm:
            layers.append(ActNorm(shape[0]))
        layers.append(AffineCoupling(shape, "checkerboard", i % 2, "mlp", hidden_dim,
                                     num_blocks, scale_clamp))
    return MultiscaleTransform([CompositeTransform(layers)], [shape])


class RealNVP(nn.Module):
    """A RealNVP flow on 8-bit images with honest bits per dimension.

    x (dequantised, in [0, 1)) -> logit pre-processing -> flow -> z ~ N(0, I). ``log_prob``
    counts every Jacobian term, including the -D log 256 of the dequantisation, so that
    its mean over the dequantisation noise bounds the log-probability of the 8-bit image
    and -log_prob / (D ln 2) is comparable with published bits/dim.

    Arguments:
        arch: "conv" (multi-scale, residual conv couplings) or "mlp" (the report's).
        image_shape: (C, H, W) of the data.
        hidden_dim: conditioner width; None picks 32 channels (conv) or 1024 units (mlp).
        num_blocks: residual blocks (conv) or hidden layers (mlp) per conditioner.
        num_couplings: couplings per mask type and scale (conv); the mlp arch stacks
            2 * num_couplings.
        num_scales: squeezes / factor-outs of the conv arch.
        actnorm: ActNorm before every coupling.
        alpha: the logit pre-processing's squeeze, logit(alpha + (1 - 2 alpha) x).
        scale_clamp: bound on each coupling's log-scale.
        temperature: standard deviation of the prior when sampling.
        dequantization: "uniform", the noise that :meth:`prepare` adds, or "variational",
            a learned q(u|x) (:class:`VariationalDequantizer`) that replaces it, whose
            log-density :meth:`log_prob` subtracts, so the bound stays a bound.

    Example:
        >>> flow = RealNVP(hidden_dim=8, num_blocks=1, num_couplings=1)
        >>> x = RealNVP.prepare(torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8))
        >>> z, logabsdet = flow(x)
        >>> z.shape, flow.log_prob(x).shape
        (torch.Size([5, 784]), torch.Size([5]))
        >>> torch.allclose(flow.inverse(z)[0], x, atol=1e-4)
        True
        >>> flow.sample(3).shape
        torch.Size([3, 1, 28, 28])
    """

    name = "flow"
    curves = {"bits per dimension": ["train_bpd", "val_bpd"]}
    best_metric = ("val_bpd", "min")

    def __init__(self, arch: str = "conv", image_shape: Shape = (1, 28, 28),
                 hidden_dim: int | None = None, num_blocks: int = 1, num_couplings: int = 3,
                 num_scales: int = 2, actnorm: bool = True, alpha: float = 1e-6,
                 scale_clamp: float = 2.0, temperature: float = 1.0,
                 dequantization: str = "uniform"):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.num_dims = math.prod(self.image_shape)
        self.latent_shape = (self.num_dims,)
        self.alpha, self.temperature = alpha, temperature
        if arch == "conv":
            self.flow = build_conv_flow(self.image_shape, hidden_dim or 32, num_blocks,
                                        num_couplings, num_scales, actnorm, scale_clamp)
        elif arch == "mlp":
            self.flow = build_mlp_flow(self.image_shape, hidden_dim or 1024, num_blocks,
                                       num_couplings, actnorm, scale_clamp)
        else:
            raise ValueError(f"arch must be 'conv' or 'mlp', not {arch!r}")
        if dequantization not in ("uniform", "variational"):
            raise ValueError(f"dequantization must be 'uniform' or 'variational', "
                             f"not {dequantization!r}")
        self.dequantizer = (VariationalDequantizer(self.image_shape)
                            if dequantization == "variational" else None)
        self._grad_clip = 0.0
        self._warmup_steps = 0

    @classmethod
    def from_config(cls, cfg, image_shape: Shape = (1, 28, 28)) -> "RealNVP":
        _, h, w = image_shape
        if cfg.arch == "conv" and (h % 2**cfg.num_scales or w % 2**cfg.num_scales):
            fits = max(k for k in range(cfg.num_scales + 1) if h % 2**k == 0 == w % 2**k)
            raise DgmError(f"the conv flow's --num-scales {cfg.num_scales} squeezes need image "
                           f"height and width divisible by {2**cfg.num_scales}, and these images "
                           f"are {h}x{w}; use --num-scales {fits} or --arch mlp")
        return cls(cfg.arch, image_shape, hidden_dim=cfg.hidden_dim, num_blocks=cfg.num_blocks,
                   num_couplings=cfg.num_couplings, num_scales=cfg.num_scales,
                   actnorm=cfg.actnorm, alpha=cfg.alpha, scale_clamp=cfg.scale_clamp,
                   temperature=cfg.temperature, dequantization=cfg.dequantization)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantised images to latents: (B, C, H, W) in [0, 1) -> z (B, D), logabsdet (B,).

        logabsdet counts the logit pre-processing and every flow layer (not the constant
        -D log 256 of the dequantisation, which :meth:`log_prob` adds).
        """
        y, ld_logit = logit_transform(x, self.alpha)
        z, ld_flow = self.flow(y)
        return z, ld_logit + ld_flow

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents to images: z (B, D) -> x (B, C, H, W) in [0, 1], logabsdet (B,)."""
        y, ld_flow = self.flow.inverse(z)
        x = logit_inverse(y, self.alpha)
        _, ld_logit = logit_transform(x, self.alpha)
        return x, ld_flow - ld_logit

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log density of dequantised images on the 0..256 intensity scale, in nats: (B,).

        log N(z; 0, I) + log|det dz/dx| - D log 256 (report eq. 46, with the pre-processing).
        Its mean over the dequantisation noise is a lower bound on log P(8-bit image).

        With variational dequantisation the uniform noise in x is replaced by a draw
        u ~ q(u|x) and log q(u|x) is subtracted: a one-draw estimate of
        E_q[log p(x + u) - log q(u|x)], the bound that q tightens.
        """
        log_q = 0.0
        if self.dequantizer is not None:
            x = (x * 256).floor().clamp(0, 255) / 256  # the 8-bit image under the noise
            u, log_q = self.dequantizer(x)
            x = x + u / 256
        z, logabsdet = self(x)
        return std_normal_log_prob(z) + logabsdet + dequantize_logdet(self.num_dims) - log_q

    def bits_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        """-log_prob / (D ln 2) per image: (B, C, H, W) -> (B,)."""
        return bits_per_dim(-self.log_prob(x), self.num_dims)

    @torch.no_grad()
    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from latents: (B, D) -> (B, C, H, W)."""
        return self.inverse(z)[0].clamp(0, 1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images from the prior N(0, temperature^2 I): (n, C, H, W) in [0, 1]."""
        p = next(self.parameters())
        z = torch.randn(n, *self.latent_shape, generator=generator, device=p.device)
        return self.generate(self.temperature * z.to(p.dtype))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation (ActNorm) from one batch of prepared images."""
        was_training = self.training
        self.train()
        self.log_prob(x)
        self.train(was_training)

    # The trainer's interface.

    @staticmethod
    def prepare(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform dequantisation of uint8 images, (x + u) / 256 (see dgm.maths.dequantize)."""
        return dequantize(x, generator)

    def configure_optimizers(self, cfg) -> dict[str, torch.optim.Optimizer]:
        self._grad_clip, self._warmup_steps = cfg.grad_clip, cfg.warmup_steps
        opt = adam(self.parameters(), lr=cfg.lr)
        # The step count lives in the param group, so that it is saved with the optimiser
        # and a resumed run continues the warm-up where it stopped.
        opt.param_groups[0]["base_lr"] = cfg.lr
        opt.param_groups[0]["num_steps"] = 0
        return {"adam": opt}

    def training_step(self, x: torch.Tensor, optimizers: dict) -> dict[str, torch.Tensor]:
        opt = optimizers["adam"]
        group = opt.param_groups[0]
        if self._warmup_steps:
            # Linear learning-rate warm-up: the first Adam steps, with poor second-moment
            # estimates, are the ones that destabilise deep flows.
            group["lr"] = group["base_lr"] * min(1.0, (group["num_steps"] + 1)
                                                 / self._warmup_steps)
        group["num_steps"] += 1
        bpd = self.bits_per_dim(x).mean()
        opt.zero_grad(set_to_none=True)
        bpd.backward()
        if self._grad_clip:
            nn.utils.clip_grad_norm_(self.parameters(), self._grad_clip)
        opt.step()
        return {"train_bpd": bpd.detach()}

    @torch.no_grad()
    def validation_step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"val_bpd": self.bits_per_dim(x).mean()}

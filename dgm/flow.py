"""RealNVP: a normalizing flow of affine couplings (Dinh, Sohl-Dickstein & Bengio, 2017).

Every layer is a transform with the contract of nflows: ``forward(x) -> (y, logabsdet)``
and ``inverse(y) -> (x, logabsdet)``, logabsdet of shape (B,). The flow maps a
dequantised image through the logit pre-processing and a stack of couplings to a
standard normal latent; log p(x) is the change-of-variables sum (report eq. 46).

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

from dgm.maths import (
    bits_per_dim,
    dequantize,
    dequantize_logdet,
    logit_inverse,
    logit_transform,
    std_normal_log_prob,
)
from dgm.optim import adam

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "CompositeTransform",
    "MultiscaleTransform",
    "RealNVP",
    "Squeeze",
    "Transform",
    "checkerboard_mask",
]

Shape = tuple[int, int, int]


class Transform(nn.Module):
    """A bijection with a tractable Jacobian: ``forward`` and ``inverse`` both return
    ``(outputs, logabsdet)``, logabsdet = log |det d outputs / d inputs| per example (B,)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class CompositeTransform(Transform):
    """Transforms applied in order; log-determinants add (report eq. 46)."""

    def __init__(self, transforms: list[Transform]):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, ld = t(x)
            total = total + ld
        return x, total

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = y.new_zeros(y.shape[0])
        for t in reversed(self.transforms):
            y, ld = t.inverse(y)
            total = total + ld
        return y, total


def checkerboard_mask(height: int, width: int, parity: int = 0) -> torch.Tensor:
    """(1, 1, H, W) float mask, 1 where (row + col + parity) is even: the pixels kept fixed."""
    rows = torch.arange(height).view(-1, 1)
    cols = torch.arange(width).view(1, -1)
    return ((rows + cols + parity) % 2 == 0).float().view(1, 1, height, width)


class Squeeze(Transform):
    """Space-to-depth (C, H, W) -> (4C, H/2, W/2) (RealNVP section 3.6); volume-preserving."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(b, 4 * c, h // 2, w // 2), x.new_zeros(b)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = y.shape
        y = y.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return y.reshape(b, c // 4, 2 * h, 2 * w), y.new_zeros(b)


class ActNorm(Transform):
    """Per-channel affine y = (x + loc) * exp(log_scale) (Glow, Kingma & Dhariwal, 2018).

    The first forward pass in training mode sets loc and log_scale so that the outputs of
    that batch have zero mean and unit variance per channel. Whether this happened is the
    buffer ``initialized``, so it is saved in the state dict and a resumed or loaded model
    is never re-initialised.
    """

    def __init__(self, num_channels: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        dims = (0, 2, 3)
        self.loc.copy_(-x.mean(dims, keepdim=True))
        self.log_scale.copy_(-torch.log(x.std(dims, keepdim=True) + 1e-6))
        self.initialized.fill_(True)

    def _logabsdet(self, x: torch.Tensor) -> torch.Tensor:
        return (self.log_scale.sum() * x.shape[2] * x.shape[3]).expand(x.shape[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not self.initialized:
            self._initialize(x)
        return (x + self.loc) * torch.exp(self.log_scale), self._logabsdet(x)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return y * torch.exp(-self.log_scale) - self.loc, -self._logabsdet(y)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.net(h)


def conv_net(in_channels: int, out_channels: int, hidden: int, num_blocks: int) -> nn.Module:
    """RealNVP's conditioner: 3x3 conv, residual blocks, 3x3 conv to the (s, t) channels.

    The last layer starts at zero, so every coupling starts as the identity, which keeps
    the first steps of a deep flow stable.
    """
    out = nn.Conv2d(hidden, out_channels, 3, padding=1)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    return nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=1),
                         *(ResidualBlock(hidden) for _ in range(num_blocks)), nn.ReLU(), out)


def mlp_net(in_features: int, out_features: int, hidden: int, num_layers: int) -> nn.Module:
    """The report's conditioner: an MLP with ReLU hidden layers; the last layer starts at zero."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(max(1, num_layers)):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    out = nn.Linear(width, out_features)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    return nn.Sequential(*layers, out)


class AffineCoupling(Transform):
    """Affine coupling layer (RealNVP eqs. 7-9): y_b = x_b * exp(s(x_a)) + t(x_a), y_a = x_a.

    ``mask="checkerboard"`` keeps the pixels of :func:`checkerboard_mask` (``parity``
    chooses which), ``mask="channel"`` keeps the first (parity 0) or second half of the
    channels. The log-scale is soft-clamped, s = c * tanh(s_raw / c), so that no single
    layer can blow up or collapse a dimension; the log-determinant is sum(s) over the
    changed dimensions, and the inverse is exact: x_b = (y_b - t(y_a)) * exp(-s(y_a)).

    Arguments:
        shape: (C, H, W) of the inputs.
        mask: "checkerboard" or "channel".
        parity: 0 or 1, which part is kept.
        net: conditioner type, "conv" or "mlp".
        hidden_dim: channels (conv) or units (mlp) of the conditioner.
        num_blocks: residual blocks (conv) or hidden layers (mlp).
        scale_clamp: bound c on |s|.
    """

    def __init__(self, shape: Shape, mask: str = "checkerboard", parity: int = 0,
                 net: str = "conv", hidden_dim: int = 32, num_blocks: int = 1,
                 scale_clamp: float = 2.0):
        super().__init__()
        c, h, w = shape
        if mask not in ("checkerboard", "channel"):
            raise ValueError(f"mask must be 'checkerboard' or 'channel', not {mask!r}")
        if mask == "channel" and c % 2:
            raise ValueError(f"a channel mask needs an even number of channels, not {c}")
        self.mask_type, self.parity, self.scale_clamp = mask, parity, scale_clamp
        self.shape = (c, h, w)
        if mask == "checkerboard":
            self.register_buffer("mask", checkerboard_mask(h, w, parity), persistent=False)
            c_in, c_out = c, c
        else:
            c_in, c_out = c // 2, c - c // 2
        if net == "conv":
            # A checkerboard conditioner also sees the mask, so it knows which pixels are real.
            extra = 1 if mask == "checkerboard" else 0
            self.net = conv_net(c_in + extra, 2 * c_out, hidden_dim, num_blocks)
        elif net == "mlp":
            self.net = nn.Sequential(
                nn.Flatten(), mlp_net(c_in * h * w, 2 * c_out * h * w, hidden_dim, num_blocks),
                nn.Unflatten(1, (2 * c_out, h, w)))
        else:
            raise ValueError(f"net must be 'conv' or 'mlp', not {net!r}")
        self.net_type = net

    def _scale_shift(self, x_kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mask_type == "checkerboard" and self.net_type == "conv":
            x_kept = torch.cat([x_kept, self.mask.expand(len(x_kept), 1, -1, -1)], 1)
        s, t = self.net(x_kept).chunk(2, dim=1)
        return self.scale_clamp * torch.tanh(s / self.scale_clamp), t

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x.chunk(2, dim=1)
        return (a, b) if self.parity == 0 else (b, a)

    def _join(self, kept: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
        return torch.cat([kept, changed] if self.parity == 0 else [changed, kept], 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mask_type == "checkerboard":
            m = self.mask.to(x.dtype)
            s, t = self._scale_shift(x * m)
            s, t = s * (1 - m), t * (1 - m)  # the kept pixels pass unchanged
            return x * torch.exp(s) + t, s.flatten(1).sum(1)
        kept, changed = self._split(x)
        s, t = self._scale_shift(kept)
        return self._join(kept, changed * torch.exp(s) + t), s.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mask_type == "checkerboard":
            m = self.mask.to(y.dtype)
            s, t = self._scale_shift(y * m)
            s, t = s * (1 - m), t * (1 - m)
            return (y - t) * torch.exp(-s), -s.flatten(1).sum(1)
        kept, changed = self._split(y)
        s, t = self._scale_shift(kept)
        return self._join(kept, (changed - t) * torch.exp(-s)), -s.flatten(1).sum(1)


class MultiscaleTransform(Transform):
    """RealNVP's multi-scale architecture (section 3.6) as one transform to a flat latent.

    After every level but the last, the first half of the channels is factored out: it
    goes straight to the latent (and the prior), and the next level works on the rest.
    Outputs are the concatenated flattened pieces, (B, C*H*W).

    Arguments:
        levels: the transforms of each level.
        out_shapes: (C, H, W) of each level's output.
    """

    def __init__(self, levels: list[Transform], out_shapes: list[Shape]):
        super().__init__()
        self.levels = nn.ModuleList(levels)
        self.out_shapes = [tuple(s) for s in out_shapes]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total, zs = x.new_zeros(x.shape[0]), []
        for i, level in enumerate(self.levels):
            x, ld = level(x)
            total = total + ld
            if i < len(self.levels) - 1:
                z, x = x.chunk(2, dim=1)
                zs.append(z.flatten(1))
        zs.append(x.flatten(1))
        return torch.cat(zs, 1), total

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = z.shape[0]
        sizes = [math.prod(s) // 2 for s in self.out_shapes[:-1]]
        sizes.append(math.prod(self.out_shapes[-1]))
        pieces = list(z.split(sizes, dim=1))
        total = z.new_zeros(b)
        x = pieces[-1].reshape(b, *self.out_shapes[-1])
        for i in reversed(range(len(self.levels))):
            if i < len(self.levels) - 1:
                c, h, w = self.out_shapes[i]
                x = torch.cat([pieces[i].reshape(b, c // 2, h, w), x], 1)
            x, ld = self.levels[i].inverse(x)
            total = total + ld
        return x, total


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
                 scale_clamp: float = 2.0, temperature: float = 1.0):
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
        self._grad_clip = 0.0
        self._warmup_steps = 0

    @classmethod
    def from_config(cls, cfg) -> "RealNVP":
        return cls(cfg.arch, hidden_dim=cfg.hidden_dim, num_blocks=cfg.num_blocks,
                   num_couplings=cfg.num_couplings, num_scales=cfg.num_scales,
                   actnorm=cfg.actnorm, alpha=cfg.alpha, scale_clamp=cfg.scale_clamp,
                   temperature=cfg.temperature)

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
        """
        z, logabsdet = self(x)
        return std_normal_log_prob(z) + logabsdet + dequantize_logdet(self.num_dims)

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

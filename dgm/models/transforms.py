"""The layers of a normalizing flow, with the contract of nflows.

Every layer is a transform: ``forward(x) -> (y, logabsdet)`` and
``inverse(y) -> (x, logabsdet)``, logabsdet of shape (B,). Couplings are affine
(Dinh, Sohl-Dickstein & Bengio, 2017) with checkerboard or channel masks; their
conditioners are small residual conv nets or MLPs; ActNorm (Kingma & Dhariwal, 2018)
normalises activations per channel; a squeeze trades space for channels, and
``MultiscaleTransform`` factors half of the channels out after each squeeze.
The model built from them is :class:`dgm.models.flow.RealNVP`.
"""

import math

import torch
from torch import nn

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "CompositeTransform",
    "MultiscaleTransform",
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
        # Reading the buffer is a data-dependent branch, which would split a compiled graph
        # at every ActNorm; the trainer initialises the flow before it compiles it.
        if self.training and not torch.compiler.is_compiling() and not self.initialized:
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
        context_channels: channels of a ``context`` (B, K, H, W) that the conditioner also
            sees (conv only), making the coupling a bijection of x for each context, as
            the variational dequantiser q(u|x) needs.
    """

    def __init__(self, shape: Shape, mask: str = "checkerboard", parity: int = 0,
                 net: str = "conv", hidden_dim: int = 32, num_blocks: int = 1,
                 scale_clamp: float = 2.0, context_channels: int = 0):
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
            extra = (1 if mask == "checkerboard" else 0) + context_channels
            self.net = conv_net(c_in + extra, 2 * c_out, hidden_dim, num_blocks)
        elif net == "mlp":
            self.net = nn.Sequential(
                nn.Flatten(), mlp_net(c_in * h * w, 2 * c_out * h * w, hidden_dim, num_blocks),
                nn.Unflatten(1, (2 * c_out, h, w)))
        else:
            raise ValueError(f"net must be 'conv' or 'mlp', not {net!r}")
        if context_channels and net != "conv":
            raise ValueError("a context needs the conv conditioner")
        self.net_type = net

    def _scale_shift(self, x_kept: torch.Tensor, context: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mask_type == "checkerboard" and self.net_type == "conv":
            x_kept = torch.cat([x_kept, self.mask.expand(len(x_kept), 1, -1, -1)], 1)
        if context is not None:
            x_kept = torch.cat([x_kept, context], 1)
        # In fp32 from here on, also under bf16 autocast: the affine map and its log-det are
        # then exact for the conditioner's output, so forward and inverse are one bijection.
        s, t = self.net(x_kept).to(x_kept.dtype).chunk(2, dim=1)
        return self.scale_clamp * torch.tanh(s / self.scale_clamp), t

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = x.chunk(2, dim=1)
        return (a, b) if self.parity == 0 else (b, a)

    def _join(self, kept: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
        return torch.cat([kept, changed] if self.parity == 0 else [changed, kept], 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mask_type == "checkerboard":
            m = self.mask.to(x.dtype)
            s, t = self._scale_shift(x * m, context)
            s, t = s * (1 - m), t * (1 - m)  # the kept pixels pass unchanged
            return x * torch.exp(s) + t, s.flatten(1).sum(1)
        kept, changed = self._split(x)
        s, t = self._scale_shift(kept, context)
        return self._join(kept, changed * torch.exp(s) + t), s.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mask_type == "checkerboard":
            m = self.mask.to(y.dtype)
            s, t = self._scale_shift(y * m, context)
            s, t = s * (1 - m), t * (1 - m)
            return (y - t) * torch.exp(-s), -s.flatten(1).sum(1)
        kept, changed = self._split(y)
        s, t = self._scale_shift(kept, context)
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

"""A small U-Net that predicts the noise (or v) of a diffused image, apart from the objective.

The DDPM design (Ho et al., 2020, appendix B; as in lucidrains/denoising-diffusion-pytorch
and VDM): residual blocks with GroupNorm and a sinusoidal time embedding added inside each
block, a down path that halves the resolution between levels, self-attention at the lowest
resolution, and an up path that takes the down path's activations as skip connections.
The network knows nothing of schedules or losses: :mod:`dgm.models.diffusion` owns those.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet", "sinusoidal_embedding"]


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style features of times t in [0, 1]: (B,) -> (B, dim).

    t is scaled by 1000 so that the frequencies span the range DDPM's integer steps did.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / max(half - 1, 1))
    # At least fp32 (a bf16 t cannot resolve 1000 t), and fp64 for a float64 model.
    args = 1000.0 * t.to(torch.promote_types(t.dtype, torch.float32))[:, None] * freqs[None]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    return F.pad(emb, (0, dim % 2))


def _groups(channels: int) -> int:
    # 8 groups as in small DDPMs, fewer when the width is not a multiple of 8 (tiny tests).
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv, + time embedding, GroupNorm, SiLU, dropout, conv; plus skip.

    (B, c_in, H, W), (B, T) -> (B, c_out, H, W). The last conv starts at zero, so every
    block starts as the identity (or its 1x1 skip) and the deep net trains from step one.
    """

    def __init__(self, c_in: int, c_out: int, time_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, residual: (B, C, H, W) -> same."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)  # (B, HW, C)
        a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.out(a.transpose(1, 2).reshape(b, c, h, w))


class UNet(nn.Module):
    """eps- or v-prediction network: z_t (B, C, H, W), t (B,) in [0, 1] -> (B, C, H, W).

    Arguments:
        in_channels: C of the images.
        channels: width of the first level.
        channel_mults: width of each level as a multiple of ``channels``; the resolution
            halves between levels, so H and W must be divisible by 2 ** (levels - 1).
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        dropout: dropout inside the residual blocks.

    Example:
        >>> net = UNet(1, channels=8, channel_mults=(1, 2), num_res_blocks=1)
        >>> net(torch.randn(2, 1, 28, 28), torch.rand(2)).shape
        torch.Size([2, 1, 28, 28])
    """

    def __init__(self, in_channels: int = 1, channels: int = 32,
                 channel_mults: tuple[int, ...] = (1, 2, 2), num_res_blocks: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        self.levels = len(channel_mults)
        time_dim = 4 * channels
        self.channels = channels
        self.time_mlp = nn.Sequential(nn.Linear(channels, time_dim), nn.SiLU(),
                                      nn.Linear(time_dim, time_dim))
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)

        # Down path: the width of every activation kept for a skip connection.
        self.down = nn.ModuleList()
        skips, c = [channels], channels
        for i, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(c, channels * mult, time_dim, dropout))
                c = channels * mult
                skips.append(c)
            if i < self.levels - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)

        self.mid1 = ResBlock(c, c, time_dim, dropout)
        self.mid_attn = Attention(c)  # self-attention at the lowest resolution
        self.mid2 = ResBlock(c, c, time_dim, dropout)

        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(c + skips.pop(), channels * mult, time_dim, dropout))
                c = channels * mult
            if i > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(c, c, 3, padding=1)))
        self.norm_out = nn.GroupNorm(_groups(c), c)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)
        # Zero output at the start: eps_hat = 0, the prediction that is best before training.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(sinusoidal_embedding(t, self.channels))  # (B, 4 channels)
        h = self.conv_in(z)
        hs = [h]
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), temb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))

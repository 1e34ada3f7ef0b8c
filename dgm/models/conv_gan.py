"""Small DCGAN-style convolutional networks for the GAN (Radford et al., 2016), sized for CPUs.

Generator: z -> linear -> (2c, H/4, W/4) -> two stride-2 transposed convolutions (to c,
then c/2 channels) with BatchNorm and ReLU -> 3x3 convolution to the image's channels,
tanh. Discriminator: two stride-2 4x4 convolutions (c, then 2c channels) with
LeakyReLU(0.2) -> one linear logit, with no BatchNorm, so that the gradient penalties
(WGAN-GP, R1), which treat each image on its own, and spectral normalisation apply. With
c = 64 on 28x28 grey images: 791,777 + 138,561 parameters.

``blocks`` > 0 adds that many 3x3 convolutions (with the same BatchNorm and ReLU in G, the
same LeakyReLU in D) at each of the three resolutions of both networks, as the "standard
CNN" of the spectral-norm paper (Miyato et al., 2018) deepens DCGAN's; 0 builds exactly
the networks above.

``minibatch_std`` appends to the discriminator's last feature maps one channel, the standard
deviation of each feature over the batch averaged to one number (the minibatch standard
deviation of Karras et al., 2018, with the whole batch as the group): a generator that
gives too little variety is then told apart from the data by that channel alone.

Both networks keep their convolution weights channels-last (NHWC): on CPUs oneDNN runs these
small convolutions, the transposed ones most, 1.4-1.5x as fast in that layout, and D takes
its input in it too (BENCHMARKS.md, "GAN: channels-last nets"). The layout changes no value beyond
rounding; Flatten still reads (C, H, W).
"""

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from dgm.errors import DgmError

__all__ = ["ConvDiscriminator", "ConvGenerator", "MinibatchStd", "apply_spectral_norm",
           "check_conv_shape"]


def check_conv_shape(image_shape: tuple[int, int, int]) -> None:
    """Refuse images that two stride-2 steps do not divide (the conv arch's one constraint)."""
    _, h, w = image_shape
    if h % 4 or w % 4:
        raise DgmError(f"--arch conv halves the image twice, so H and W must be divisible by 4; "
                       f"these images are {h}x{w}: use --arch mlp")


class ConvGenerator(nn.Module):
    """z (B, latent_dim) -> images in [-1, 1], (B, C, H, W)."""

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], channels: int = 64,
                 blocks: int = 0):
        super().__init__()
        check_conv_shape(image_shape)
        c_img, h, w = image_shape
        self.start = (2 * channels, h // 4, w // 4)
        widths = (2 * channels, channels, max(channels // 2, 1))  # at H/4, H/2, H
        # No biases before BatchNorm: its shift makes them redundant.
        self.project = nn.Linear(latent_dim, 2 * channels * (h // 4) * (w // 4), bias=False)
        layers: list[nn.Module] = [nn.BatchNorm2d(widths[0]), nn.ReLU()]
        for i, width in enumerate(widths):
            if i:
                layers += [nn.ConvTranspose2d(widths[i - 1], width, 4, 2, 1, bias=False),
                           nn.BatchNorm2d(width), nn.ReLU()]
            for _ in range(blocks):
                layers += [nn.Conv2d(width, width, 3, padding=1, bias=False),
                           nn.BatchNorm2d(width), nn.ReLU()]
        layers += [nn.Conv2d(widths[-1], c_img, 3, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers).to(memory_format=torch.channels_last)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.project(z).view(len(z), *self.start))


class MinibatchStd(nn.Module):
    """(B, C, H, W) -> (B, C + 1, H, W): the extra channel is the mean over (C, H, W) of each
    feature's standard deviation over the batch, the same for every image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The biased std (a batch of one gives 0, not NaN); in fp32 under bf16 autocast.
        std = (x.float().var(0, unbiased=False) + 1e-8).sqrt().mean().to(x.dtype)
        return torch.cat([x, std.expand(len(x), 1, *x.shape[2:])], 1)


class ConvDiscriminator(nn.Module):
    """Images (B, C, H, W) in [-1, 1] -> one logit (or critic score) per image, (B,)."""

    def __init__(self, image_shape: tuple[int, int, int], channels: int = 64, blocks: int = 0,
                 minibatch_std: bool = False):
        super().__init__()
        check_conv_shape(image_shape)
        c_img, h, w = image_shape
        layers: list[nn.Module] = []
        width = c_img
        for i, out in enumerate((channels, 2 * channels, 2 * channels)):  # at H, H/2, H/4
            for _ in range(blocks):
                layers += [nn.Conv2d(width, out, 3, padding=1), nn.LeakyReLU(0.2)]
                width = out
            if i < 2:
                layers += [nn.Conv2d(width, out, 4, 2, 1), nn.LeakyReLU(0.2)]
                width = out
        if minibatch_std:
            layers.append(MinibatchStd())
            width += 1
        layers += [nn.Flatten(), nn.Linear(width * (h // 4) * (w // 4), 1)]
        self.net = nn.Sequential(*layers).to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x.contiguous(memory_format=torch.channels_last)).squeeze(1)
        return logits.to(x.dtype)  # fp32 logits for the losses under bf16


def apply_spectral_norm(module: nn.Module) -> nn.Module:
    """Divide every linear and convolution weight of ``module`` by its largest singular value
    (of the weight reshaped to (out, -1)), estimated by one power iteration per training
    forward pass (Miyato et al., 2018). In place; returns ``module``."""
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            setattr(module, name, spectral_norm(child))
        else:
            apply_spectral_norm(child)
    return module

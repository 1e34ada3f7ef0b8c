"""A diffusion model with an honest bits/dim bound (Kingma et al., 2021, "Variational
Diffusion Models", VDM) and samples in tens of steps (Ho et al., 2020; Song et al., 2021).

The process: 8-bit data x in [-1, 1] (bin centres 2 (k + 1/2) / 256 - 1) is diffused as
z_t = alpha_t x + sigma_t eps, variance preserving (alpha_t^2 + sigma_t^2 = 1), with the
schedule given by gamma(t) = -log SNR(t) = log(sigma_t^2 / alpha_t^2), rising from gamma_min
at t = 0 to gamma_max at t = 1. Then alpha_t^2 = sigmoid(-gamma_t), sigma_t^2 = sigmoid(gamma_t).

The negative log-likelihood of an 8-bit image is bounded, in nats, by three terms (VDM eq. 11):

- prior: KL(q(z_1 | x) || N(0, I)), closed form;
- diffusion: 1/2 E_{t ~ U(0, 1), eps} [gamma'(t) ||eps - eps_hat(z_t, t)||^2] in continuous
  time (VDM eq. 17), or with T steps T/2 E_i [expm1(gamma_t - gamma_s) ||eps - eps_hat||^2],
  s = (i - 1) / T, t = i / T (VDM eq. 13 written in eps), which is larger and falls to the
  continuous one as T grows;
- reconstruction: -E log p(x | z_0) with the discrete decoder that puts a softmax over the
  256 values of each pixel, logits -1/2 ((z_0 / alpha_0 - x_k) alpha_0 / sigma_0)^2.

The network (:class:`dgm.models.unet.UNet`) predicts eps or v = alpha_t eps - sigma_t x; this
module owns the schedule, the objectives, the bound and the samplers.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from dgm.errors import DgmError
from dgm.maths import bits_per_dim, kl_std_normal
from dgm.models.unet import UNet
from dgm.optim import adam

__all__ = ["Diffusion", "NoiseSchedule", "alpha_sigma", "decoder_log_prob", "decoder_logits",
           "diffusion_loss", "diffusion_loss_discrete", "prior_kl", "to_unit_range"]

VOCAB = 256  # values of an 8-bit pixel


def to_unit_range(x_uint8: torch.Tensor) -> torch.Tensor:
    """8-bit values k -> bin centres 2 (k + 1/2) / 256 - 1 in (-1, 1), as VDM scales them."""
    return 2 * (x_uint8.float() + 0.5) / VOCAB - 1


def to_values(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_unit_range`: bin centres -> integer values 0..255 (long)."""
    return ((x + 1) * VOCAB / 2 - 0.5).round().clamp(0, VOCAB - 1).long()


class NoiseSchedule:
    """gamma(t) = -log SNR(t) on t in [0, 1], from gamma_min to gamma_max, and gamma'(t).

    ``linear``: gamma linear in t (VDM's fixed schedule). ``cosine``: alpha_t = cos(pi u / 2)
    (Nichol & Dhariwal, 2021), gamma = 2 log tan(pi u / 2), u rescaled so that the ends are
    gamma_min and gamma_max. In continuous time the bound depends on the schedule only
    through its ends (VDM section 5.1); the schedule changes the Monte-Carlo variance, the
    ``simple`` loss's weighting of noise levels and where the samplers' steps fall.
    """

    def __init__(self, kind: str = "linear", gamma_min: float = -13.3, gamma_max: float = 5.0):
        if kind not in ("linear", "cosine"):
            raise ValueError(f"schedule must be 'linear' or 'cosine', not {kind!r}")
        if not gamma_min < gamma_max:
            raise ValueError(f"gamma_min {gamma_min} must be below gamma_max {gamma_max}")
        self.kind, self.gamma_min, self.gamma_max = kind, gamma_min, gamma_max
        # u in [u0, u1] with tan(pi u / 2) = exp(gamma / 2) at both ends.
        self.u0 = 2 / math.pi * math.atan(math.exp(gamma_min / 2))
        self.u1 = 2 / math.pi * math.atan(math.exp(gamma_max / 2))

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return self.gamma_min + (self.gamma_max - self.gamma_min) * t
        return 2 * torch.log(torch.tan(math.pi / 2 * (self.u0 + (self.u1 - self.u0) * t)))

    def gamma_prime(self, t: torch.Tensor) -> torch.Tensor:
        """d gamma / dt, > 0: (B,) -> (B,)."""
        if self.kind == "linear":
            return torch.full_like(t, self.gamma_max - self.gamma_min)
        v = math.pi / 2 * (self.u0 + (self.u1 - self.u0) * t)
        # d/dv 2 log tan v = 2 / (sin v cos v) = 4 / sin 2v, times dv/dt.
        return 2 * math.pi * (self.u1 - self.u0) / torch.sin(2 * v)

    def time_of(self, gamma: float) -> float:
        """The t in [0, 1] at which gamma(t) = ``gamma`` (the inverse of :meth:`gamma`)."""
        if self.kind == "linear":
            return (gamma - self.gamma_min) / (self.gamma_max - self.gamma_min)
        return (2 / math.pi * math.atan(math.exp(gamma / 2)) - self.u0) / (self.u1 - self.u0)

    def bound_times(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Times for the bound's diffusion term from uniform draws u (B,): the t at which
        gamma(t) = gamma_min + (gamma_max - gamma_min) u, and the weight gamma'(t) / p(t) =
        gamma_max - gamma_min that keeps 1/2 weight ||eps - eps_hat||^2 unbiased.

        Drawn uniform in log SNR, the integrand is bounded, whatever the schedule (VDM eq. 17
        with gamma as the variable). Drawn uniform in t, the cosine schedule puts few draws
        at its ends, where gamma' is large, and the estimate's variance explodes (17x the
        linear schedule's standard error in a pilot, BENCHMARKS.md). On the linear schedule
        the two draws are the same: (u, gamma').
        """
        if self.kind == "linear":
            return u, self.gamma_prime(u)
        gamma = self.gamma_min + (self.gamma_max - self.gamma_min) * u
        t = (2 / math.pi * torch.atan(torch.exp(gamma / 2)) - self.u0) / (self.u1 - self.u0)
        return t, torch.full_like(u, self.gamma_max - self.gamma_min)


def alpha_sigma(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha = sqrt(sigmoid(-gamma)), sigma = sqrt(sigmoid(gamma)): variance preserving."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))  # (B,) -> (B, 1, 1, 1)


def prior_kl(x: torch.Tensor, gamma_1: torch.Tensor) -> torch.Tensor:
    """KL(q(z_1 | x) || N(0, I)) = KL(N(alpha_1 x, sigma_1^2 I) || N(0, I)), in nats.

    x (B, ...), gamma_1 scalar or (B,) -> (B,).
    """
    gamma_1 = torch.as_tensor(gamma_1, dtype=x.dtype, device=x.device).expand(len(x))
    alpha, _ = alpha_sigma(gamma_1)
    mu = (_bcast(alpha, x) * x).flatten(1)
    logvar = -F.softplus(-gamma_1)  # log sigmoid(gamma_1) = log sigma_1^2
    return kl_std_normal(mu, _bcast(logvar, mu).expand_as(mu))


def diffusion_loss(eps: torch.Tensor, eps_hat: torch.Tensor,
                   gamma_prime: torch.Tensor) -> torch.Tensor:
    """The continuous-time diffusion term for one draw of t per image (VDM eq. 17), nats:
    1/2 gamma'(t) ||eps - eps_hat||^2. eps, eps_hat (B, ...), gamma_prime (B,) -> (B,)."""
    return 0.5 * gamma_prime * (eps - eps_hat).square().flatten(1).sum(1)


def diffusion_loss_discrete(eps: torch.Tensor, eps_hat: torch.Tensor, gamma_t: torch.Tensor,
                            gamma_s: torch.Tensor, steps: int) -> torch.Tensor:
    """The T-step diffusion term for one draw of the step i per image (VDM eq. 13), nats:
    T/2 (SNR(s) / SNR(t) - 1) ||eps - eps_hat||^2 with s = t - 1/T, since
    ||x - x_hat||^2 = ||eps - eps_hat||^2 / SNR(t). (B, ...), (B,), (B,) -> (B,)."""
    weight = 0.5 * steps * torch.expm1(gamma_t - gamma_s)
    return weight * (eps - eps_hat).square().flatten(1).sum(1)


def decoder_logits(z_0: torch.Tensor, gamma_0: float | torch.Tensor) -> torch.Tensor:
    """Logits of p(x | z_0) over the 256 values of each pixel: (B, ...) -> (B, ..., 256).

    Value k sits at its bin centre x_k; its logit is -1/2 ((z_0 / alpha_0 - x_k) / s)^2 with
    s = sigma_0 / alpha_0 = exp(gamma_0 / 2): a Gaussian around z_0 / alpha_0, normalised over
    the 256 values (VDM appendix; their code's ``logprob``).
    """
    gamma_0 = torch.as_tensor(gamma_0, dtype=z_0.dtype, device=z_0.device)
    alpha_0, _ = alpha_sigma(gamma_0)
    values = to_unit_range(torch.arange(VOCAB, device=z_0.device)).to(z_0.dtype)
    return -0.5 * ((z_0 / alpha_0)[..., None] - values).square() * torch.exp(-gamma_0)


def decoder_log_prob(z_0: torch.Tensor, x_values: torch.Tensor,
                     gamma_0: float | torch.Tensor) -> torch.Tensor:
    """log p(x | z_0) of integer images x_values (B, ...) in 0..255, summed: (B,)."""
    log_p = torch.log_softmax(decoder_logits(z_0, gamma_0), dim=-1)
    return log_p.gather(-1, x_values[..., None]).flatten(1).sum(1)


def stratified_times(n: int, device, dtype=torch.float32,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """n times in [0, 1) spread evenly, (u + i / n) mod 1 with one uniform u (VDM's
    low-discrepancy sampler): each is uniform, together they cover [0, 1). (n,)."""
    u = torch.rand((), generator=generator, device=device, dtype=dtype)
    return torch.remainder(u + torch.arange(n, device=device, dtype=dtype) / n, 1.0)


class Diffusion(nn.Module):
    """A variational diffusion model on 8-bit images: a U-Net and the process around it.

    Arguments:
        image_shape: (C, H, W); H and W divisible by 2 ** (len(channel_mults) - 1).
        channels, channel_mults, num_res_blocks, dropout: the U-Net's (see :class:`UNet`).
        loss: ``elbo``, the continuous-time bound in bits/dim (VDM), or ``simple``, the
            unweighted mean squared error of eps with t uniform (Ho et al., 2020).
        parameterization: what the network predicts, ``eps`` or ``v`` = alpha eps - sigma x
            (Salimans & Ho, 2022); eps_hat = sigma z + alpha v_hat either way.
        schedule, gamma_min, gamma_max: the noise schedule (:class:`NoiseSchedule`).
        sampler: ``ddpm`` (ancestral) or ``ddim``, with ``sample_steps`` steps, for
            :meth:`sample`; :meth:`generate` is always deterministic DDIM.
        sample_eta: DDIM's eta in :meth:`sample`: 0 is deterministic, 1 draws what the
            ancestral step draws, between them part of the ancestral noise.
        sample_rho: where the samplers' steps fall (:meth:`time_grid`): 0, equal steps of t;
            rho > 0, the spacing of Karras et al. (2022).

    Example:
        >>> model = Diffusion((1, 8, 8), channels=8, channel_mults=(1, 2), sample_steps=3)
        >>> x = model.prepare(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8))
        >>> sorted(model.bound_terms(x))
        ['diffusion', 'mse', 'prior', 'reconstruction', 'total']
        >>> model.sample(2).shape
        torch.Size([2, 1, 8, 8])
    """

    name = "diffusion"

    def __init__(self, image_shape: tuple[int, int, int] = (1, 28, 28), channels: int = 32,
                 channel_mults: tuple[int, ...] = (1, 2, 2), num_res_blocks: int = 1,
                 dropout: float = 0.0, loss: str = "elbo", parameterization: str = "eps",
                 schedule: str = "linear", gamma_min: float = -13.3, gamma_max: float = 5.0,
                 sampler: str = "ddpm", sample_steps: int = 25, sample_rho: float = 3.0,
                 sample_eta: float = 0.0):
        super().__init__()
        for what, value, allowed in (("loss", loss, ("elbo", "simple")),
                                     ("parameterization", parameterization, ("eps", "v")),
                                     ("sampler", sampler, ("ddpm", "ddim"))):
            if value not in allowed:
                raise ValueError(f"{what} must be one of {allowed}, not {value!r}")
        self.image_shape = tuple(image_shape)
        self.latent_shape = self.image_shape  # generate(z) maps noise images z_1 to images
        self.num_dims = math.prod(self.image_shape)
        self.loss, self.parameterization = loss, parameterization
        self.sampler, self.sample_steps, self.sample_rho = sampler, sample_steps, sample_rho
        self.sample_eta = sample_eta
        self.schedule = NoiseSchedule(schedule, gamma_min, gamma_max)
        self.net = UNet(self.image_shape[0], channels, tuple(channel_mults), num_res_blocks,
                        dropout)
        self.curves = {"bits per dimension (upper bound)": ["train_bpd", "val_bpd"],
                       "mean squared error of eps": ["train_mse", "val_mse"]}
        # The simple loss does not bound anything; its own validation value picks the best.
        self.best_metric = ("val_bpd", "min") if loss == "elbo" else ("val_mse", "min")

    @classmethod
    def from_config(cls, cfg, image_shape: tuple[int, int, int] = (1, 28, 28)) -> "Diffusion":
        _, h, w = image_shape
        factor = 2 ** (len(cfg.channel_mults) - 1)
        if not cfg.channel_mults or min(cfg.channel_mults) < 1:
            raise DgmError(f"--channel-mults must be one or more integers >= 1, got "
                           f"{cfg.channel_mults}")
        if h % factor or w % factor:
            raise DgmError(f"the U-Net's {len(cfg.channel_mults)} levels halve the image "
                           f"{len(cfg.channel_mults) - 1} times, which needs height and width "
                           f"divisible by {factor}, and these images are {h}x{w}; give fewer "
                           "--channel-mults")
        if cfg.sample_eta and cfg.sampler != "ddim":
            raise DgmError(f"--sample-eta is DDIM's, and --sampler is {cfg.sampler}: give "
                           "--sampler ddim too")
        if not cfg.gamma_min < cfg.gamma_max:
            raise DgmError(f"--gamma-min {cfg.gamma_min} must be below --gamma-max "
                           f"{cfg.gamma_max}")
        return cls(image_shape, cfg.channels, tuple(cfg.channel_mults), cfg.num_res_blocks,
                   cfg.dropout, cfg.loss, cfg.parameterization, cfg.schedule, cfg.gamma_min,
                   cfg.gamma_max, cfg.sampler, cfg.sample_steps, cfg.sample_rho, cfg.sample_eta)

    # The process.

    def _gamma(self, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.gamma(t)

    def predict_eps(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_hat(z_t, t): (B, C, H, W), (B,) -> (B, C, H, W), whatever the network predicts."""
        out = self.net(z, t)
        if self.parameterization == "eps":
            return out
        alpha, sigma = alpha_sigma(self._gamma(t))
        return _bcast(sigma, z) * z + _bcast(alpha, z) * out  # from v = alpha eps - sigma x

    def reconstruction_nll(self, x: torch.Tensor, z_0: torch.Tensor) -> torch.Tensor:
        """-log p(x | z_0) with the discrete decoder, nats: (B, ...) -> (B,)."""
        return -decoder_log_prob(z_0, to_values(x), self.schedule.gamma_min)

    def bound_terms(self, x: torch.Tensor, t: torch.Tensor | None = None,
                    eps: torch.Tensor | None = None, eps_0: torch.Tensor | None = None,
                    steps: int | None = None,
                    weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The upper bound on -log p(x) (``total``) and its three terms, one draw each, in
        nats, and ``mse``, the mean squared error of eps_hat: (B,) each.

        x: (B, C, H, W) prepared images in [-1, 1]. t: (B,) times; default: stratified over
        the batch and uniform in log SNR (:meth:`NoiseSchedule.bound_times`); with ``steps``
        T the T-step bound, t then on the grid i / T, i >= 1. weight: the continuous diffusion
        term's gamma'(t) / p(t) (default gamma'(t): given times count as uniform in t).
        eps, eps_0: the noise of z_t and of z_0 (default: fresh).
        """
        b = len(x)
        if t is None:
            t = stratified_times(b, x.device, x.dtype)
            if steps:
                t = torch.ceil(t * steps).clamp(1, steps) / steps
            else:
                t, weight = self.schedule.bound_times(t)
        eps = torch.randn_like(x) if eps is None else eps
        eps_0 = torch.randn_like(x) if eps_0 is None else eps_0
        gamma_t = self._gamma(t)
        alpha_t, sigma_t = alpha_sigma(gamma_t)
        z_t = _bcast(alpha_t, x) * x + _bcast(sigma_t, x) * eps
        eps_hat = self.predict_eps(z_t, t)
        if steps:
            diffusion = diffusion_loss_discrete(eps, eps_hat, gamma_t,
                                                self._gamma(t - 1 / steps), steps)
        else:
            diffusion = diffusion_loss(eps, eps_hat, self.schedule.gamma_prime(t)
                                       if weight is None else weight)
        # The two ends do not depend on the network's weights (a fixed schedule).
        with torch.no_grad():
            ones = torch.ones(b, dtype=x.dtype, device=x.device)
            alpha_0, sigma_0 = alpha_sigma(self._gamma(0 * ones))
            z_0 = _bcast(alpha_0, x) * x + _bcast(sigma_0, x) * eps_0
            reconstruction = self.reconstruction_nll(x, z_0)
            prior = prior_kl(x, self._gamma(ones))
        return {"prior": prior, "diffusion": diffusion, "reconstruction": reconstruction,
                "total": prior + diffusion + reconstruction,
                "mse": (eps - eps_hat).square().flatten(1).mean(1)}

    def bits_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        """The bound in bits per dimension, one draw of t per image: (B, ...) -> (B,)."""
        return bits_per_dim(self.bound_terms(x)["total"], self.num_dims)

    # Sampling.

    def _denoise(self, z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_hat clipped to the data's range [-1, 1] (as DDPM's sampler does), and the eps_hat
        that goes with it: z = alpha x_hat + sigma eps_hat."""
        alpha, sigma = (_bcast(v, z) for v in alpha_sigma(self._gamma(t)))
        eps_hat = self.predict_eps(z, t)
        x_hat = ((z - sigma * eps_hat) / alpha).clamp(-1, 1)
        return x_hat, (z - alpha * x_hat) / sigma

    def ancestral_step(self, z_t: torch.Tensor, t: float, s: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """One DDPM step z_t -> z_s ~ q(z_s | z_t, x = x_hat) (VDM eq. 32-34), s < t."""
        b = len(z_t)
        tt = torch.full((b,), t, dtype=z_t.dtype, device=z_t.device)
        _, eps_hat = self._denoise(z_t, tt)
        gamma_t = self._gamma(tt[:1])
        gamma_s = self._gamma(torch.full_like(tt[:1], s))
        alpha_t, sigma_t = alpha_sigma(gamma_t)
        alpha_s, sigma_s = alpha_sigma(gamma_s)
        c = -torch.expm1(gamma_s - gamma_t)  # 1 - SNR(t) / SNR(s), in (0, 1)
        noise = torch.randn(z_t.shape, generator=generator, device=z_t.device, dtype=z_t.dtype)
        return alpha_s / alpha_t * (z_t - sigma_t * c * eps_hat) + sigma_s * c.sqrt() * noise

    def ddim_step(self, z_t: torch.Tensor, t: float, s: float, eta: float = 0.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """One DDIM step (Song et al., 2021, eq. 12): z_s = alpha_s x_hat
        + sqrt(sigma_s^2 - std^2) eps_hat + std noise, std = eta * the posterior's std;
        eta = 0 is deterministic, eta = 1 draws what the ancestral step draws."""
        tt = torch.full((len(z_t),), t, dtype=z_t.dtype, device=z_t.device)
        x_hat, eps_hat = self._denoise(z_t, tt)
        gamma_t = self._gamma(tt[:1])
        gamma_s = self._gamma(torch.full_like(tt[:1], s))
        alpha_s, sigma_s = alpha_sigma(gamma_s)
        std = eta * sigma_s * (-torch.expm1(gamma_s - gamma_t)).sqrt()
        z_s = alpha_s * x_hat + (sigma_s.square() - std.square()).clamp_min(0).sqrt() * eps_hat
        if eta:
            z_s = z_s + std * torch.randn(z_t.shape, generator=generator, device=z_t.device,
                                          dtype=z_t.dtype)
        return z_s

    def time_grid(self, steps: int) -> list[float]:
        """The samplers' ``steps`` + 1 times, from 1 down to 0.

        ``sample_rho`` 0: equal steps of t. rho > 0: sigma / alpha = exp(gamma / 2) spaced as
        Karras et al. (2022, eq. 5) space their sigmas, equal steps of its 1/rho-th power
        between the schedule's ends; the smaller rho, the more steps at high noise, where the
        samples' shapes form (BENCHMARKS.md, "Diffusion": rho 3 at 25 steps scored about as
        equal steps of t at 50).
        """
        if not self.sample_rho:
            return [i / steps for i in range(steps, -1, -1)]
        rho, sched = self.sample_rho, self.schedule
        hi, lo = (math.exp(g / (2 * rho)) for g in (sched.gamma_max, sched.gamma_min))
        grid = [sched.time_of(2 * rho * math.log(hi + i / steps * (lo - hi)))
                for i in range(steps + 1)]
        grid[0], grid[-1] = 1.0, 0.0  # exactly the ends, whatever the rounding
        return grid

    @torch.no_grad()
    def reverse(self, z_1: torch.Tensor, steps: int, sampler: str = "ddim", eta: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """z_1 (B, C, H, W) -> images in [0, 1] through ``steps`` steps of t from 1 to 0
        (:meth:`time_grid`).

        The last z_0 is rescaled, z_0 / alpha_0: within sigma_0 / alpha_0 = exp(gamma_min / 2)
        (1e-3 at -13.3) of the decoder's mode, well inside an 8-bit bin.
        """
        z = z_1
        grid = self.time_grid(steps)
        for t, s in zip(grid[:-1], grid[1:], strict=True):
            if sampler == "ddpm":
                z = self.ancestral_step(z, t, s, generator)
            else:
                z = self.ddim_step(z, t, s, eta, generator)
        alpha_0, _ = alpha_sigma(self._gamma(torch.zeros((), dtype=z.dtype, device=z.device)))
        return ((z / alpha_0).clamp(-1, 1) + 1) / 2

    @torch.no_grad()
    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from noise images z_1 through deterministic DDIM (eta = 0), so a
        path between noise images is a path between images: (B, C, H, W) -> same."""
        return self.reverse(z.view(len(z), *self.image_shape), self.sample_steps, "ddim")

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images (n, C, H, W) in [0, 1]: z_1 ~ N(0, I), then ``sample_steps`` steps of the
        model's sampler, every draw from ``generator``."""
        p = next(self.parameters())
        z = torch.randn(n, *self.image_shape, generator=generator, device=p.device)
        return self.reverse(z.to(p.dtype), self.sample_steps, self.sampler, self.sample_eta,
                            generator)

    # The trainer's interface.

    @staticmethod
    def prepare(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 images -> bin centres in (-1, 1) (:func:`to_unit_range`); no noise: the
        discrete decoder accounts for the 8 bits."""
        return to_unit_range(x)

    def configure_optimizers(self, cfg) -> dict[str, torch.optim.Optimizer]:
        self._grad_clip = cfg.grad_clip
        return {"adam": adam(self.parameters(), cfg.lr)}

    def training_step(self, x: torch.Tensor, optimizers: dict) -> dict[str, torch.Tensor]:
        """One Adam step on the bound (``elbo``, in bits/dim) or the simple loss.

        x: (B, C, H, W) in [-1, 1]. t is stratified over the batch, so every batch sees
        every noise level: uniform in log SNR for the bound, uniform in t for the simple loss
        (its weighting of noise levels is the schedule's). Returns the bound (bits/dim) and
        the eps error either way.
        """
        t = stratified_times(len(x), x.device, x.dtype) if self.loss == "simple" else None
        terms = self.bound_terms(x, t)
        bpd = bits_per_dim(terms["total"], self.num_dims).mean()
        mse = terms["mse"].mean()
        loss = bpd if self.loss == "elbo" else mse
        opt = optimizers["adam"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if getattr(self, "_grad_clip", 0.0):
            nn.utils.clip_grad_norm_(self.parameters(), self._grad_clip)
        opt.step()
        return {"train_bpd": bpd.detach(), "train_mse": mse.detach()}

    @torch.no_grad()
    def validation_step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        terms = self.bound_terms(x)
        out = {"val_bpd": bits_per_dim(terms["total"], self.num_dims).mean(),
               "val_mse": terms["mse"].mean()}
        if self.loss == "simple" and self.schedule.kind != "linear":
            # The bound draws t uniform in log SNR, the simple loss uniform in t: its
            # validation value is drawn as it is trained.
            t = stratified_times(len(x), x.device, x.dtype)
            out["val_mse"] = self.bound_terms(x, t)["mse"].mean()
        return out

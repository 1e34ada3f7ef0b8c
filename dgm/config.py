"""Training configurations: one flat dataclass per model, defaults that reproduce the report.

Every field is an option: the command line makes a flag of it (``latent_dim`` ->
``--latent-dim``), a YAML file may set it, and the run folder records it.
Flags win over YAML, YAML over defaults. ``metadata`` holds the help text and
the allowed range, checked by :func:`validate`.
"""

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field

from dgm.errors import DgmError

__all__ = ["CONFIGS", "DiffusionConfig", "FlowConfig", "GANConfig", "TrainConfig", "VAEConfig",
           "config_class", "from_dict"]


def opt(default, help: str, **limits):
    """A config field with help text and limits (min, max, below, choices, check: a test)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **limits})
    return field(default=default, metadata={"help": help, **limits})


# torch seeds are 64-bit; the trainer also seeds generators with seed + 1 and seed + 2.
MAX_SEED = (1 << 63) - 1
# Far beyond any useful width, well below what would exhaust memory before the first step.
MAX_WIDTH = 1 << 14


@dataclass
class TrainConfig:
    dataset: str = opt("mnist", "mnist, fashion-mnist, or a path to your own images: a folder "
                                "of IDX files, an .npz file or a folder of PNGs",
                       check=lambda v: v in ("mnist", "fashion-mnist") or _is_path(v))
    data_dir: str | None = opt(None, "folder holding <dataset>/ IDX files of the built-in data "
                                     "sets (else DGM_DATA_DIR, the cache, /usr/share/datasets, "
                                     "download)")
    offline: bool = opt(False, "never download data")
    train_split: str = opt("train[:90%]", "training split, e.g. 'train', 'test[:9000]'")
    val_split: str = opt("train[90%:]", "validation split, e.g. 'test[9000:]'")
    test_split: str = opt("test", "test split used by 'dgm evaluate'")
    epochs: int = opt(40, "number of epochs", min=0)
    batch_size: int = opt(128, "images per optimisation step", min=1, max=1 << 16)
    lr: float = opt(1e-3, "Adam learning rate", min=0.0)
    lr_schedule: str = opt("constant", "learning rate over the epochs: constant, or cosine "
                                       "decay towards 0 (Loshchilov & Hutter, 2017)",
                           choices=("constant", "cosine"))
    ema: float = opt(0.0, "decay of a moving average of the weights that validation, the best "
                          "checkpoint, pictures and evaluation use (0 = off; e.g. 0.999)",
                     min=0.0, below=1.0)
    patience: int = opt(0, "stop when the validation metric has not improved for this many "
                           "epochs (0 = train every epoch)", min=0)
    seed: int = opt(0, "random seed for weights, batches and noise", min=0, max=MAX_SEED)
    sample_epochs: list[int] = opt([0, 10, 20, 30, 40],
                                   "epochs at which to save a sample grid (0 = before training)")
    num_samples: int = opt(16, "images in each sample grid", min=1, max=1024)
    device: str = opt("auto", "where to train", choices=("auto", "cpu", "cuda"))
    precision: str = opt("fp32", "bf16: autocast of the networks on a GPU with bf16 or a CPU "
                                 "with native bf16 (AVX512-BF16, AMX); auto: bf16 where it is "
                                 "native, else fp32; what is cited stays fp32",
                         choices=("fp32", "bf16", "auto"))
    threads: int = opt(0, "CPU threads (0 = as many cores as other processes leave idle, "
                          "checked every 2 s)", min=0, max=1024)
    tensorboard: bool = opt(False, "also log to RUN/tensorboard (needs: pip install tensorboard)")


@dataclass
class VAEConfig(TrainConfig):
    latent_dim: int = opt(20, "size of the latent space (2 draws the manifold)", min=1,
                          max=MAX_WIDTH)
    hidden_dim: int = opt(500, "width of the encoder's and decoder's hidden layer", min=1,
                          max=MAX_WIDTH)
    hidden_layers: int = opt(1, "hidden layers of the encoder and of the decoder", min=1, max=8)
    prior: str = opt("gaussian", "p(z): N(0, I) (gaussian) or the VampPrior, a mixture of the "
                                 "posteriors of learned pseudo-inputs (vamp)",
                     choices=("gaussian", "vamp"))
    num_pseudo_inputs: int = opt(500, "pseudo-inputs of the VampPrior", min=1, max=MAX_WIDTH)
    iwae_k: int = opt(1, "samples of the training objective: 1 = the ELBO, k > 1 = the IWAE "
                         "bound (Burda et al., 2016)", min=1, max=1000)
    kl_warmup_steps: int = opt(0, "steps over which the KL weight rises from 0 to 1 (0 = off)",
                               min=0)
    manifold_epochs: list[int] = opt([0, 20, 40], "epochs at which to draw the manifold "
                                                  "(latent_dim 2 only)")
    manifold_size: int = opt(20, "rows and columns of the manifold picture", min=2, max=100)


@dataclass
class GANConfig(TrainConfig):
    latent_dim: int = opt(100, "size of the generator's noise input", min=1, max=MAX_WIDTH)
    epochs: int = opt(200, "number of epochs", min=0)
    # BatchNorm in the generator needs two images per batch (and per process).
    batch_size: int = opt(64, "images per optimisation step", min=2, max=1 << 16)
    lr: float = opt(5e-4, "Adam learning rate of the generator, and of the discriminator "
                          "unless --d-lr", min=0.0)
    d_lr: float | None = opt(None, "Adam learning rate of the discriminator alone (default: "
                                   "--lr; a larger one is TTUR, Heusel et al., 2017)", min=0.0)
    # The report gives no betas. beta1 0.5 (Radford et al., 2016) keeps this GAN training;
    # with Adam's default 0.9 the discriminator wins within one epoch (D(G(z)) -> 1e-4).
    beta1: float = opt(0.5, "Adam beta1 (0.5 as in DCGAN; 0.9 lets D win at once)",
                       min=0.0, below=1.0)
    beta2: float = opt(0.999, "Adam beta2", min=0.0, below=1.0)
    arch: str = opt("mlp", "networks: the report's MLPs (mlp) or small DCGAN-style conv nets "
                           "(conv; H and W divisible by 4)", choices=("mlp", "conv"))
    hidden_dim: int | None = opt(None, "base channels of the conv arch (default 64; the mlp "
                                       "arch keeps the report's widths)", min=1, max=MAX_WIDTH)
    d_hidden_dim: int | None = opt(None, "base channels of the conv discriminator alone "
                                         "(default: --hidden-dim), as DCGAN's ndf",
                                   min=1, max=MAX_WIDTH)
    num_blocks: int = opt(0, "extra 3x3 convolutions at each resolution of the conv generator "
                             "and discriminator (0 = DCGAN's depth)", min=0, max=16)
    loss: str = opt("ns", "adversarial loss: non-saturating from logits (ns), hinge (Miyato et "
                          "al., 2018) or WGAN-GP (wgan-gp; Gulrajani et al., 2017)",
                    choices=("ns", "hinge", "wgan-gp"))
    gp_weight: float = opt(10.0, "weight of WGAN-GP's gradient penalty (--loss wgan-gp)", min=0.0)
    spectral_norm: bool = opt(False, "spectral normalisation of the discriminator's layers "
                                     "(Miyato et al., 2018)")
    minibatch_std: bool = opt(False, "a minibatch standard deviation channel at the end of the "
                                     "conv discriminator (Karras et al., 2018), against "
                                     "too little variety")
    r1_weight: float = opt(0.0, "weight gamma of the R1 penalty gamma/2 E||grad D(x)||^2 on real "
                                "images (Mescheder et al., 2018; 0 = off)", min=0.0)
    d_steps: int = opt(1, "discriminator updates per generator update (each with fresh noise, "
                          "on the step's real batch)", min=1, max=100)
    temperature: float = opt(1.0, "standard deviation of z when sampling: below 1 trades "
                                  "variety for fidelity (the truncation trick's simple form)",
                             min=0.0)
    sample_epochs: list[int] = opt([0, 2, 8, 100, 200],
                                   "epochs at which to save a sample grid (0 = before training)")


@dataclass
class FlowConfig(TrainConfig):
    arch: str = opt("conv", "couplings: multi-scale residual conv nets (conv) or the report's "
                            "MLPs (mlp)", choices=("conv", "mlp"))
    hidden_dim: int | None = opt(None, "conditioner width (default: 32 channels for conv, "
                                       "1024 units for mlp)", min=1, max=MAX_WIDTH)
    num_blocks: int = opt(1, "residual blocks (conv) or hidden layers (mlp) per coupling", min=1,
                          max=64)
    num_couplings: int = opt(3, "couplings per mask type and scale (the mlp arch stacks twice "
                                "this many)", min=1, max=64)
    num_scales: int = opt(2, "squeeze + factor-out steps of the conv arch", min=0, max=2)
    actnorm: bool = opt(True, "ActNorm before every coupling")
    dequantization: str = opt("uniform", "noise that makes the 8-bit images continuous: "
                                         "uniform, or a learned q(u|x) (variational; Ho et "
                                         "al., 2019) whose density the bound counts",
                              choices=("uniform", "variational"))
    alpha: float = opt(1e-6, "logit pre-processing squeeze: logit(alpha + (1 - 2 alpha) x)",
                       min=0.0, max=0.49)
    scale_clamp: float = opt(2.0, "bound on each coupling's log-scale (soft clamp)", min=0.01)
    temperature: float = opt(1.0, "prior standard deviation when sampling", min=0.0)
    grad_clip: float = opt(100.0, "gradient norm clip (0 = off)", min=0.0)
    warmup_steps: int = opt(200, "linear learning-rate warm-up steps (0 = off)", min=0)
    compile: bool = opt(False, "torch.compile the networks (a few minutes up front on a CPU, "
                               "then about 1.15x faster; BENCHMARKS.md)")
    # ActNorm initialises from a batch's standard deviation, which needs two images.
    batch_size: int = opt(64, "images per optimisation step", min=2, max=1 << 16)
    sample_epochs: list[int] = opt([0, 1, 13, 26, 40],
                                   "epochs at which to save a sample grid (0 = before training)")


@dataclass
class DiffusionConfig(TrainConfig):
    channels: int = opt(32, "width of the U-Net's first level", min=1, max=MAX_WIDTH)
    channel_mults: list[int] = opt([1, 2, 2], "width of each U-Net level as a multiple of "
                                              "--channels; the resolution halves between levels",
                                   items="positive integers", item_min=1)
    num_res_blocks: int = opt(1, "residual blocks per U-Net level", min=1, max=16)
    dropout: float = opt(0.0, "dropout inside the residual blocks", min=0.0, below=1.0)
    loss: str = opt("elbo", "objective: the continuous-time variational bound in bits/dim "
                            "(elbo; Kingma et al., 2021) or the unweighted eps error with t "
                            "uniform (simple; Ho et al., 2020); on the linear schedule the "
                            "two weight noise levels alike", choices=("elbo", "simple"))
    parameterization: str = opt("eps", "what the U-Net predicts: the noise (eps) or "
                                       "v = alpha eps - sigma x (v)", choices=("eps", "v"))
    schedule: str = opt("linear", "-log SNR(t) from --gamma-min to --gamma-max: linear in t "
                                  "(VDM) or the cosine schedule (Nichol & Dhariwal, 2021)",
                        choices=("linear", "cosine"))
    gamma_min: float = opt(-13.3, "-log SNR at t = 0 (sets the decoder's noise)", min=-30.0,
                           max=30.0)
    gamma_max: float = opt(5.0, "-log SNR at t = 1 (sets the prior term)", min=-30.0, max=30.0)
    sampler: str = opt("ddpm", "sampler of the sample grids, dgm sample and --sample-quality: "
                               "ancestral (ddpm) or DDIM (ddim; the recipe's ddim at 50 steps "
                               "and eta 0.5 scored best here)", choices=("ddpm", "ddim"))
    sample_steps: int = opt(25, "denoising steps per sample", min=1, max=10000)
    sample_rho: float = opt(3.0, "where the sampler's steps fall: 0 = equal steps of t; RHO > "
                                 "0 = sigma spaced as Karras et al. (2022) with that rho, more "
                                 "steps at high noise the smaller it is (3 scored best here)",
                            min=0.0, max=100.0)
    sample_eta: float = opt(0.0, "DDIM's eta (--sampler ddim): 0 = deterministic, 1 = the "
                                 "ancestral sampler's noise, between them part of it",
                            min=0.0, max=1.0)
    compile: bool = opt(False, "torch.compile the networks (a few minutes up front on a CPU, "
                               "then about 1.2x faster; BENCHMARKS.md)")
    lr: float = opt(5e-4, "Adam learning rate", min=0.0)
    grad_clip: float = opt(1.0, "gradient norm clip (0 = off)", min=0.0)
    # Diffusion samples from the raw weights are noisy; the average is what works.
    ema: float = opt(0.999, "decay of a moving average of the weights that validation, the "
                            "best checkpoint, pictures and evaluation use (0 = off)",
                     min=0.0, below=1.0)
    batch_size: int = opt(64, "images per optimisation step", min=1, max=1 << 16)
    epochs: int = opt(20, "number of epochs", min=0)
    sample_epochs: list[int] = opt([0, 1, 5, 10, 20],
                                   "epochs at which to save a sample grid (0 = before training)")


CONFIGS: dict[str, type[TrainConfig]] = {"vae": VAEConfig, "gan": GANConfig, "flow": FlowConfig,
                                         "diffusion": DiffusionConfig}


def _is_path(value: str) -> bool:
    # Only the form is checked here: a run must still load (for samples, the report) when its
    # data has moved. The data layer says what is wrong with a path when it reads it.
    return os.sep in value or value.endswith(".npz") or os.path.exists(value)


def field_type(f: dataclasses.Field) -> tuple[type, bool]:
    """(base type, whether None is allowed) of a config field."""
    t = f.type
    args = typing.get_args(t)
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        return next(a for a in args if a is not type(None)), type(None) in args
    return t, False


def _check(name: str, value, f: dataclasses.Field):
    base, nullable = field_type(f)
    if value is None and nullable:
        return value
    if typing.get_origin(base) is list:
        least = f.metadata.get("item_min", 0)
        if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= least for v in value):
            what = f.metadata.get("items", f"epochs (integers >= {least})")
            raise DgmError(f"option {name} must be a list of {what}, got {value!r}")
        return value
    if base is int and isinstance(value, float) and value.is_integer():
        value = int(value)  # 1e1 in a YAML file is the float 10.0; as a count it is whole
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          bool: lambda v: isinstance(v, bool),
          str: lambda v: isinstance(v, str)}[base](value)
    if not ok:
        raise DgmError(f"option {name} must be of type {base.__name__}, got {value!r}")
    value = float(value) if base is float else value
    if base is float and not math.isfinite(value):
        raise DgmError(f"option {name} must be a finite number, got {value!r}")
    m = f.metadata
    if "choices" in m and value not in m["choices"]:
        raise DgmError(f"option {name} must be one of {', '.join(m['choices'])}, got {value!r}")
    if "check" in m and not m["check"](value):
        raise DgmError(f"option {name} must be {m.get('help', 'valid')}, got {value!r}")
    if "min" in m and value < m["min"]:
        raise DgmError(f"option {name} must be >= {m['min']}, got {value!r}")
    if "max" in m and value > m["max"]:
        raise DgmError(f"option {name} must be <= {m['max']}, got {value!r}")
    if "below" in m and value >= m["below"]:
        raise DgmError(f"option {name} must be < {m['below']}, got {value!r}")
    return value


# Options that some models no longer offer, and why. A run that recorded one still loads:
# it changed how fast that run trained, not what it learned.
RETIRED = {"compile": "compile is offered where it pays, for flow and diffusion; the vae and "
                      "the gan measured no faster compiled (BENCHMARKS.md)"}
# Options added after runs were recorded without them, with a default other than what those
# runs did: a record that lacks one keeps the behaviour it had.
BEFORE = {"sample_rho": 0.0}


def config_class(model: str) -> type[TrainConfig]:
    """The config dataclass of a built-in model, or of your own model named by import path:
    its ``Config`` attribute (a dataclass subclassing TrainConfig), else TrainConfig."""
    if model in CONFIGS:
        return CONFIGS[model]
    from dgm.models import model_class  # only now: it imports torch and the user's module

    cls = getattr(model_class(model), "Config", TrainConfig)
    if not (isinstance(cls, type) and issubclass(cls, TrainConfig)
            and dataclasses.is_dataclass(cls)):
        raise DgmError(f"{model}.Config must be a dataclass subclassing dgm.config.TrainConfig")
    return cls


def from_dict(model: str, values: dict, source: str = "config",
              recorded: bool = False) -> TrainConfig:
    """Build and validate a model's config from plain values (YAML or flags).

    ``recorded``: the values are a run's own record, which may hold a retired option."""
    cls = config_class(model)
    if not isinstance(values, dict):
        raise DgmError(f"{source} must be a mapping of option: value, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if recorded:
        values = {k: v for k, v in values.items() if k in fields or k not in RETIRED}
        values = {k: v for k, v in BEFORE.items() if k in fields} | values
    unknown = [k for k in values if k not in fields]
    if unknown and unknown[0] in RETIRED:
        raise DgmError(f"option {unknown[0]!r} in {source}: {RETIRED[unknown[0]]}")
    if unknown:
        raise DgmError(f"unknown option {unknown[0]!r} in {source} for model {model}; "
                       f"known: {', '.join(fields)}")
    checked = {k: _check(k, v, fields[k]) for k, v in values.items()}
    return cls(**checked)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every field of an existing config (e.g. after flags were applied)."""
    for f in dataclasses.fields(cfg):
        _check(f.name, getattr(cfg, f.name), f)
    return cfg

"""Test metrics of a trained run, and loading a run's model for pictures."""

import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dgm.data import load_split, read_samples, split_overlap
from dgm.distributed import Context, autocast, resolve_device, resolve_precision, setup
from dgm.errors import DgmError
from dgm.features import SHIPPED, local_feature_net, shipped_feature_net
from dgm.maths import bits_per_dim
from dgm.models import build_model
from dgm.runs import (
    json_safe,
    load_checkpoint,
    load_config,
    load_weights,
    pack_run,
    read_evaluations,
    read_metrics,
    save_evaluation,
)
from dgm.zoo import open_run

__all__ = ["draw_pictures", "evaluate_flow", "evaluate_quality", "evaluate_run", "evaluate_vae",
           "export_run", "load", "load_model", "score_samples", "set_sampling"]

# Test images are binarised / dequantised with this seed in every run, so numbers compare.
EVAL_SEED = 1234


def load_model(run: str | Path, checkpoint: str = "best", device: str = "auto"):
    """Return ``(model name, config, model in eval mode, checkpoint dict)`` of a run folder."""
    run = Path(run)
    name, cfg = load_config(run)
    path = run / "checkpoints" / f"{checkpoint}.pt"
    if checkpoint == "best" and not path.exists():
        path = run / "checkpoints" / "last.pt"
    dev = resolve_device(device)
    ckpt = load_checkpoint(path, name, map_location=dev)
    # Checkpoints from before own data sets hold no image shape: theirs was MNIST's.
    model = build_model(name, cfg, ckpt.get("image_shape", (1, 28, 28)))
    if "ema_state_dict" in ckpt:  # trained with --ema: the averaged weights are the model
        ema = ckpt["ema_state_dict"]
        ckpt = {**ckpt, "state_dict": {k.removeprefix("module."): v for k, v in ema.items()
                                       if k.startswith("module.")}}
    load_weights(model, ckpt, path)
    return name, cfg, model.to(dev).eval(), ckpt


def set_sampling(model, name: str, run, steps: int | None = None, rho: float | None = None,
                 sampler: str | None = None, temperature: float | None = None,
                 eta: float | None = None) -> None:
    """How a model draws its samples, in place of the run's own: a diffusion model's sampler,
    denoising steps, their spacing and DDIM's eta (``--sampler``, ``--sample-steps``,
    ``--sample-rho``, ``--sample-eta``), a GAN's or flow's prior standard deviation
    (``--temperature``). None keeps the run's."""
    for flag, value, attr, kind in (("--sample-steps", steps, "sample_steps", "diffusion"),
                                    ("--sample-rho", rho, "sample_steps", "diffusion"),
                                    ("--sampler", sampler, "sample_steps", "diffusion"),
                                    ("--sample-eta", eta, "sample_steps", "diffusion"),
                                    ("--temperature", temperature, "temperature", "GAN and flow")):
        if value is not None and not hasattr(model, attr):
            raise DgmError(f"{flag} is for {kind} runs, and {run} holds a {name}")
    if steps is not None and not 1 <= steps <= 10000:
        raise DgmError("--sample-steps must lie in 1..10000")
    if rho is not None and not 0 <= rho <= 100:
        raise DgmError("--sample-rho must lie in 0..100")
    if temperature is not None and not 0 <= temperature <= 100:
        raise DgmError("--temperature must lie in 0..100")
    if eta is not None and not 0 <= eta <= 1:
        raise DgmError("--sample-eta must lie in 0..1")
    if eta is not None and (sampler or model.sampler) != "ddim":
        raise DgmError("--sample-eta is DDIM's, and these samples are ancestral (ddpm): give "
                       "--sampler ddim too")
    for attr, value in (("sample_steps", steps), ("sample_rho", rho), ("sampler", sampler),
                        ("temperature", temperature), ("sample_eta", eta)):
        if value is not None:
            setattr(model, attr, value)


def load(source: str | Path, checkpoint: str = "best", device: str = "cpu") -> torch.nn.Module:
    """The trained model of a run folder, a file that ``dgm export`` packed, or ``zoo:NAME``
    (a model that ships with dgm), in eval mode.

    >>> import dgm
    >>> dgm.load("runs/no-such-run")
    Traceback (most recent call last):
    dgm.errors.DgmError: runs/no-such-run is not a dgm run folder (no config.yaml); ...
    """
    with open_run(source) as run:
        return load_model(run, checkpoint, device)[2]


def export_run(run: str | Path, out: str | Path, checkpoint: str = "best") -> None:
    """Pack a run folder into one file: the weights that evaluation uses (the moving average
    with ``--ema``), config, metrics and evaluations (:func:`dgm.runs.pack_run`)."""
    run = Path(run)
    _, _, model, ckpt = load_model(run, checkpoint, "cpu")
    pack_run(run, Path(out), model.state_dict(), ckpt)


def draw_pictures(run: Path) -> None:
    """The curves and the pictures that the run's last epoch drew (the same noise), into
    ``run``: for a packed run, which holds none."""
    from dgm.plots import epoch_pictures, plot_curves

    name, cfg, model, ckpt = load_model(run)
    plot_curves(read_metrics(run), model.curves, run / "curves.png",
                title=f"{name} on {cfg.dataset}")
    epoch_pictures(model, cfg, run, ckpt["epoch"], final=True)


def score_samples(path: str | Path, dataset: str, split: str = "test",
                  train_split: str = "train[:90%]", val_split: str = "train[90%:]",
                  device: str = "auto", data_dir: str | None = None,
                  offline: bool = False) -> dict:
    """Sample-quality scores of anyone's samples (an .npz or a PNG folder, see
    :func:`dgm.data.read_samples`) against ``split`` of a built-in data set, in its shipped
    feature network: the scores of ``dgm evaluate --sample-quality`` for the same images."""
    from dgm.quality import sample_quality

    if dataset not in SHIPPED:
        raise DgmError(f"dgm score rates samples in a data set's shipped feature network, and "
                       f"{dataset!r} has none; give --dataset {' or '.join(SHIPPED)}")
    dev = resolve_device(device)  # a bad --device fails before any file is read
    features = shipped_feature_net(dataset)
    fakes = read_samples(path)
    x, y = load_split(dataset, split, data_dir, offline)
    if tuple(fakes.shape[1:]) != tuple(x.shape[1:]):
        raise DgmError(f"{path} holds images of shape {tuple(fakes.shape[1:])} (C, H, W), but "
                       f"{dataset} has {tuple(x.shape[1:])}")
    if len(fakes) < 4:
        raise DgmError(f"{path} holds {len(fakes)} images; scores need at least 4 (precision "
                       "and recall need k + 1 = 4), and 10000 are the usual count")
    train_x, _ = load_split(dataset, train_split, data_dir, offline)
    val_x, _ = load_split(dataset, val_split, data_dir, offline)
    t0 = time.perf_counter()
    results = {"samples": str(path), "n_samples": len(fakes), "dataset": dataset,
               "split": split, "n_images": len(x)}
    results |= sample_quality(fakes.to(dev), features, (x.to(dev), y.to(dev)),
                              train_x.to(dev), val_x.to(dev), seed=EVAL_SEED)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    return json_safe(results)


def evaluate_run(run: str | Path, split: str | None = None, iw_samples: int = 5000,
                 batch_size: int = 100, device: str = "auto", data_dir: str | None = None,
                 offline: bool = False, checkpoint: str = "best", quiet: bool = False,
                 sample_quality: bool = False, naive: bool = True,
                 dequant_samples: int = 1, time_samples: int = 8,
                 num_samples: int = 10000, sample_steps: int | None = None,
                 sample_rho: float | None = None, sampler: str | None = None,
                 temperature: float | None = None, precision: str = "fp32",
                 sample_eta: float | None = None) -> dict:
    """Compute a run's test metrics, add them to ``run/evaluation.json`` and return them.

    Each evaluation is kept under a key that says what it measured (split, checkpoint, k),
    so a quick check with another split or k does not replace the k = 5000 results.

    Under ``torchrun`` the likelihoods are spread over the ranks; rank 0 alone scores
    sample quality, writes the file and returns the results (the others return None).

    GAN runs get the sample-quality scores of :mod:`dgm.quality`, from ``num_samples``
    samples; other models get them too with ``sample_quality``. ``sampler``,
    ``sample_steps``, ``sample_rho`` and ``sample_eta`` set a diffusion model's sampler,
    denoising steps, their spacing and DDIM's eta for those samples; ``temperature`` a GAN's
    or flow's prior standard deviation; ``precision`` bf16 draws those samples under bf16
    autocast (the likelihoods stay fp32).
    """
    run = Path(run)
    ctx, dev = setup(resolve_device(device))
    try:
        return _evaluate_run(run, split, iw_samples, batch_size, str(dev), data_dir, offline,
                             checkpoint, quiet or not ctx.is_main, sample_quality, naive,
                             dequant_samples, time_samples, num_samples, sample_steps,
                             sample_rho, sampler, temperature, precision, sample_eta, ctx)
    finally:
        ctx.close()


def _evaluate_run(run, split, iw_samples, batch_size, device, data_dir, offline, checkpoint,
                  quiet, sample_quality, naive, dequant_samples, time_samples, num_samples,
                  sample_steps, sample_rho, sampler, temperature, precision, sample_eta, ctx):
    name, cfg, model, ckpt = load_model(run, checkpoint, device)
    set_sampling(model, name, run, sample_steps, sample_rho, sampler, temperature, sample_eta)
    precision = resolve_precision(precision, next(model.parameters()).device)
    read_evaluations(run)  # a corrupt evaluation.json fails now, not after the work
    split = split or cfg.test_split
    data_dir, offline = data_dir or cfg.data_dir, offline or cfg.offline
    x, y = load_split(cfg.dataset, split, data_dir, offline)
    dev = next(model.parameters()).device
    t0 = time.perf_counter()
    results = {"model": name, "dataset": cfg.dataset, "split": split, "n_images": len(x),
               "checkpoint": checkpoint, "epoch": ckpt["epoch"]}
    shape = tuple(ckpt.get("image_shape", (1, 28, 28)))
    if tuple(x.shape[1:]) != shape:
        raise DgmError(f"split {split!r} of {cfg.dataset} has images of shape "
                       f"{tuple(x.shape[1:])}, but the run's model takes {shape}")
    if sample_quality and (y < 0).any():
        raise DgmError(f"--sample-quality needs class labels (its feature classifier learns "
                       f"them) and split {split!r} of {cfg.dataset} has none")
    features = None
    if (name == "gan" or sample_quality) and cfg.dataset in SHIPPED:
        features = shipped_feature_net(cfg.dataset)  # a changed file is refused before any work
    shared = split_overlap(cfg.dataset, split, cfg.train_split, data_dir, offline)
    if shared:
        results["warning"] = (f"{shared} of these {len(x)} images are in the training split "
                              f"{cfg.train_split!r}: this is not a test result")
        if ctx.is_main:
            print(f"dgm: warning: {results['warning']}", file=sys.stderr)
    if len(x) < ctx.world:
        raise DgmError(f"split {split!r} has {len(x)} images, fewer than the {ctx.world} "
                       "processes")
    if name == "vae":
        results |= evaluate_vae(model, x.to(dev), iw_samples, batch_size, quiet, ctx, naive)
    elif name == "flow":
        results |= evaluate_flow(model, x.to(dev), batch_size, quiet, ctx, dequant_samples)
    elif name == "diffusion":
        results |= evaluate_diffusion(model, x.to(dev), time_samples, batch_size, quiet, ctx)
    if not ctx.is_main:
        return None
    if name == "gan" and (y < 0).any():
        results["sample_quality"] = "skipped: the data have no class labels, which its feature " \
                                    "classifier needs"
    elif name == "gan" or sample_quality:
        results |= evaluate_quality(model, cfg, x.to(dev), y.to(dev), data_dir, offline, quiet,
                                    features, num_samples, precision)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    key = f"{split} ({checkpoint}" + (f", k={iw_samples})" if name == "vae" else
                                      f", dequantisation draws={dequant_samples})"
                                      if name == "flow" and dequant_samples > 1 else
                                      f", time draws={time_samples})" if name == "diffusion"
                                      else ")")
    if "frechet" in results and num_samples != 10000:  # a quick look keeps the 10000's
        key = key[:-1] + f", samples={num_samples})"
    # Samples drawn otherwise than the run's own way are scored under a key of their own.
    for label, value in (("sample steps", sample_steps), ("sample rho", sample_rho),
                         ("sampler", sampler), ("sample eta", sample_eta),
                         ("temperature", temperature),
                         ("precision", None if precision == "fp32" else precision)):
        if "frechet" in results and value is not None:
            shown = f"{value:g}" if isinstance(value, float) else value
            key = key[:-1] + f", {label}={shown})"
    save_evaluation(run, key, results)
    return json_safe(results)


def _summary(values: torch.Tensor, dims: int) -> dict:
    """Mean log p(x) over images in nats, its standard error over images, and bits/dim."""
    values = values.double()
    mean = values.mean().item()
    sem = (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else math.nan
    return {"log_px_nats": mean, "sem_nats": sem, "bits_per_dim": bits_per_dim(-mean, dims)}


@torch.no_grad()
def evaluate_vae(model, x_uint8: torch.Tensor, k: int, batch_size: int = 100,
                 quiet: bool = False, ctx: Context | None = None, naive: bool = True) -> dict:
    """Test ELBO, IWAE_k and the naive prior-sampling estimate of log p(x), in nats per image.

    ``naive=False`` leaves out the naive estimate, which costs as much as the IWAE one.

    Each estimate comes with ``sem_nats`` (standard error of the mean over images) and
    ``mc_stderr_nats`` / ``ess`` (the per-image Monte-Carlo standard error and effective
    sample size, averaged over images), which show how poorly the naive estimator converges.
    Under ``torchrun`` each rank estimates its part of the images.
    """
    ctx = ctx or Context()
    x = model.prepare(x_uint8, torch.Generator(x_uint8.device).manual_seed(EVAL_SEED))
    torch.manual_seed(EVAL_SEED + ctx.rank)
    dims = x[0].numel()
    part = x[ctx.part(len(x))]
    values: dict[str, list] = {}
    batches = range(0, len(part), batch_size)
    estimators = {"iwae": "posterior", "naive": "prior"} if naive else {"iwae": "posterior"}
    for start in tqdm(batches, desc=f"{' and '.join(estimators)} estimates, k={k}",
                      disable=quiet or None):
        xb = part[start:start + batch_size]
        values.setdefault("elbo", []).append(model.elbo(xb))
        for key, proposal in estimators.items():
            for stat, v in zip(("", "_se", "_ess"), model.log_likelihood(xb, k, proposal),
                               strict=True):
                values.setdefault(key + stat, []).append(v)
    v = {key: ctx.gather(torch.cat(parts)) for key, parts in values.items()}
    out = {"elbo": _summary(v["elbo"], dims)}
    for key in estimators:
        out[key] = {"k": k, **_summary(v[key], dims),
                    "mc_stderr_nats": v[key + "_se"].mean().item(),
                    "ess": v[key + "_ess"].mean().item()}
    return out


@torch.no_grad()
def evaluate_flow(model, x_uint8: torch.Tensor, batch_size: int = 100,
                  quiet: bool = False, ctx: Context | None = None,
                  dequant_samples: int = 1) -> dict:
    """Exact test log-likelihood of a flow, in nats per image and bits/dim.

    Exact up to the dequantisation: each image gets one uniform noise draw (seed
    ``EVAL_SEED``), so the mean is an unbiased estimate of the variational bound
    E_u[log p((x + u) / 256)] - D log 256 <= log P(x), and ``sem_nats`` is its
    standard error over images. Under ``torchrun`` each rank takes a part of the images.

    With ``dequant_samples`` K > 1, ``log_px_iw`` adds the importance-weighted bound over
    K draws (the first being the one above), log 1/K sum_k p_256(x + u_k) <= log P(x),
    which is tighter and rises to log P(x) as K grows, since P(x) = E_u[p_256(x + u)] for
    uniform u (Ho et al., 2019, Flow++, section 3.1).
    """
    ctx = ctx or Context()
    gen = torch.Generator(x_uint8.device).manual_seed(EVAL_SEED)
    dims = x_uint8[0].numel()
    draws = []
    for k in range(dequant_samples):
        part = model.prepare(x_uint8, gen)[ctx.part(len(x_uint8))]
        batches = range(0, len(part), batch_size)
        desc = "exact log p(x)" + (f", dequantisation {k + 1}/{dequant_samples}"
                                   if dequant_samples > 1 else "")
        draws.append(torch.cat([model.log_prob(part[s:s + batch_size])
                                for s in tqdm(batches, desc=desc, disable=quiet or None)]))
    out = _summary(ctx.gather(draws[0]), dims)
    results = {"log_px": {**out, "bits_per_dim_sem": bits_per_dim(out["sem_nats"], dims),
                          "dequantization": "uniform, one draw per image"}}
    if dequant_samples > 1:
        iw = torch.logsumexp(torch.stack(draws).double(), 0) - math.log(dequant_samples)
        out = _summary(ctx.gather(iw), dims)
        results["log_px_iw"] = {
            **out, "bits_per_dim_sem": bits_per_dim(out["sem_nats"], dims),
            "dequantization": f"uniform, importance-weighted over {dequant_samples} draws"}
    return results


@torch.no_grad()
def evaluate_diffusion(model, x_uint8: torch.Tensor, time_samples: int = 8,
                       batch_size: int = 100, quiet: bool = False,
                       ctx: Context | None = None) -> dict:
    """An upper bound on -log P(x) of the 8-bit test images for a diffusion model, in nats
    per image and bits/dim, with every term counted: the prior KL(q(z_1|x) || N(0, I)),
    the continuous-time diffusion term and the discrete decoder's reconstruction term.

    Each image gets ``time_samples`` K draws of the noise level, stratified per image
    ((u + k / K) mod 1, so together they cover [0, 1)) and uniform in log SNR
    (:meth:`~dgm.models.diffusion.NoiseSchedule.bound_times`), each with fresh noise. Per
    image the K values average to an unbiased estimate of its bound; ``sem_nats`` is the
    standard error over images (which includes the Monte-Carlo noise), and
    ``mc_stderr_nats`` the Monte-Carlo standard error of the time integral per image, std
    over the K draws / sqrt(K) averaged over images (conservative: it treats the stratified
    draws as independent, and stratifying lowers the variance), with
    ``mc_stderr_mean_nats`` its effect on the mean over images.
    """
    ctx = ctx or Context()
    torch.manual_seed(EVAL_SEED + ctx.rank)
    gen = torch.Generator(x_uint8.device).manual_seed(EVAL_SEED + ctx.rank)
    dims = x_uint8[0].numel()
    part = model.prepare(x_uint8[ctx.part(len(x_uint8))])
    k = time_samples
    draws: dict[str, list] = {}
    for start in tqdm(range(0, len(part), batch_size), desc=f"diffusion bound, {k} t per image",
                      disable=quiet or None):
        xb = part[start:start + batch_size]
        u = torch.rand(len(xb), 1, generator=gen, device=xb.device)
        u = torch.remainder(u + torch.arange(k, device=xb.device)[None] / k, 1.0)  # (B, K)
        per: dict[str, list] = {}
        for j in range(k):
            t, weight = model.schedule.bound_times(u[:, j])
            for name, v in model.bound_terms(xb, t, weight=weight).items():
                per.setdefault(name, []).append(v.double())
        for name, vs in per.items():
            draws.setdefault(name, []).append(torch.stack(vs, 1))  # (B, K)
    v = {name: ctx.gather(torch.cat(parts)) for name, parts in draws.items()}  # (N, K) each
    total = v["total"]
    n = len(total)
    mc = total.std(1) / math.sqrt(k) if k > 1 else torch.full((n,), math.nan)
    out = _summary(-total.mean(1), dims)
    bound = {"nll_bound_nats": -out["log_px_nats"], "sem_nats": out["sem_nats"],
             "bits_per_dim": out["bits_per_dim"],
             "bits_per_dim_sem": bits_per_dim(out["sem_nats"], dims),
             "mc_stderr_nats": mc.mean().item(),
             "mc_stderr_mean_nats": (mc.square().mean() / n).sqrt().item(),
             "time_draws_per_image": k,
             "time_draws": "stratified per image, (u + k/K) mod 1, uniform in log SNR",
             "note": "mc_stderr treats the K stratified draws as independent, so it is an "
                     "upper estimate (often far above the truth); sem_nats includes the "
                     "Monte-Carlo noise, so the mean's Monte-Carlo error is at most sem_nats"}
    terms = {f"{name}_nats": v[name].mean().item() for name in ("prior", "diffusion",
                                                               "reconstruction")}
    terms |= {f"{name}_bits_per_dim": bits_per_dim(v[name].mean().item(), dims)
              for name in ("prior", "diffusion", "reconstruction")}
    return {"nll_bound": bound, "terms": terms}


def evaluate_quality(model, cfg, x_uint8: torch.Tensor, labels: torch.Tensor,
                     data_dir: str | None = None, offline: bool = False,
                     quiet: bool = False, features: tuple | None = None,
                     n_samples: int = 10000, precision: str = "fp32") -> dict:
    """Frechet and kernel distances, precision and recall and the Parzen log-likelihood of
    a model's samples against the test images, in ``features`` (the data set's shipped
    network and its description), else in a network trained on the run's training split
    and cached (see :func:`dgm.quality.sample_quality`)."""
    from dgm.quality import draw_samples, sample_quality

    dev = x_uint8.device
    train_x, train_y = load_split(cfg.dataset, cfg.train_split, data_dir, offline)
    val_x, _ = load_split(cfg.dataset, cfg.val_split, data_dir, offline)
    if (train_y < 0).any():
        raise DgmError(f"sample quality needs class labels (its feature classifier learns them) "
                       f"and training split {cfg.train_split!r} of {cfg.dataset} has none")
    train_x, train_y = train_x.to(dev), train_y.to(dev)
    if features is None:
        if not quiet:
            print(f"dgm: sample quality: {cfg.dataset} has no shipped feature network; one is "
                  "trained on the training split once, then cached", file=sys.stderr)
        features = local_feature_net(cfg.dataset, train_x, train_y, quiet=quiet)
    gen = torch.Generator(dev).manual_seed(EVAL_SEED)
    with autocast(dev, precision):
        fakes = draw_samples(lambda n, g: model.sample(n, generator=g), n_samples, gen)
    return sample_quality(fakes, features, (x_uint8, labels), train_x, val_x.to(dev),
                          seed=EVAL_SEED)

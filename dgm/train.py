"""The one trainer: loop, devices, checkpoints, metrics, pictures and their cadence.

Each model owns its update rule (``configure_optimizers``, ``training_step``,
``validation_step``, ``prepare``); this module owns everything around it.
"""

import dataclasses
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from dgm import interrupts
from dgm.config import TrainConfig
from dgm.data import load_split, split_overlap
from dgm.distributed import (
    Context,
    autocast,
    resolve_device,
    resolve_precision,
    setup,
)
from dgm.errors import DgmError
from dgm.models import MODELS, build_model
from dgm.plots import epoch_pictures, plot_curves
from dgm.report import write_report
from dgm.runs import (
    DiskFull,
    RunLock,
    check_no_links,
    check_run_folder,
    holds_results,
    is_dgm_run,
    load_checkpoint,
    load_weights,
    remove_stale_temps,
    save_checkpoint,
    save_config,
    write_metrics,
)
from dgm.threads import ThreadPolicy

__all__ = ["MODELS", "build_model", "resolve_device", "train"]

class NonFiniteLoss(DgmError):
    pass


class Interrupted(DgmError):
    exit_code = 130  # the shell's convention for SIGINT


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def train(model_name: str, cfg: TrainConfig, run: Path, resume: bool = False,
          quiet: bool = False) -> tuple[torch.nn.Module, list[dict]]:
    """Train ``model_name`` with ``cfg`` into the run folder ``run``.

    Returns the trained model and the metrics rows (one dict per epoch).

    With ``resume`` the run continues from ``run/checkpoints/last.pt``, restoring weights,
    optimiser and random states, so that the result equals an uninterrupted run. Under
    ``torchrun`` every rank trains on its shard of each batch and only rank 0 writes.
    """
    run = Path(run)
    # SIGTERM from the start, so that a run stopped while it starts up still cleans up.
    old_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    # Adam's moments of weights whose gradient is almost always 0 (the VAE's weights from
    # the blank border pixels) decay into subnormal floats, on which x86 arithmetic is many
    # times slower: by epoch 260 of the VAE recipe they were 31 % of its optimiser state and
    # an epoch took 2.5x its early time (BENCHMARKS.md). Flushing them to 0 changes nothing
    # above 1e-38. torch has no getter for the setting: a subnormal that survives arithmetic
    # says it is off.
    was_off = (torch.tensor(1e-39) * 1.0).item() > 0
    flushing = was_off and torch.set_flush_denormal(True)  # False where the CPU cannot
    try:
        ctx, device = setup(resolve_device(cfg.device))
        try:
            result = _train(model_name, cfg, run, resume, quiet or not ctx.is_main, ctx, device)
            ctx.barrier()
            return result
        finally:
            ctx.close()
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and "alloc" not in str(e) and "out of memory" \
                not in str(e):
            raise
        raise DgmError(f"out of memory ({str(e).strip().splitlines()[-1][:100]}); lower "
                       "--batch-size or the model's size (--hidden-dim, --latent-dim)") from None
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        if flushing:
            torch.set_flush_denormal(False)  # as the caller had it


def _train(model_name, cfg, run, resume, quiet, ctx, device):
    # The run's config.yaml records the precision it ran in, not "auto".
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))
    if cfg.batch_size % ctx.world:
        raise DgmError(f"--batch-size {cfg.batch_size} is not divisible by the {ctx.world} "
                       "processes; each takes an equal part of every batch")
    least = next(f for f in dataclasses.fields(cfg) if f.name == "batch_size").metadata["min"]
    if cfg.batch_size // ctx.world < least:
        raise DgmError(f"--batch-size {cfg.batch_size} leaves fewer than {least} images to each "
                       f"of the {ctx.world} processes; give --batch-size {least * ctx.world} or "
                       "more")
    last_path = run / "checkpoints" / "last.pt"
    if not resume:
        check_run_folder(run)
        if holds_results(run):
            raise DgmError(f"{run} already holds a run; continue it with --resume {run} "
                           "or choose another --out")
    elif not is_dgm_run(run):
        raise DgmError(f"{run} is not a dgm run folder; give the folder that 'dgm train' wrote")
    elif not last_path.exists() and holds_results(run):
        raise DgmError(f"{run} has no checkpoints/last.pt to continue from, but holds results "
                       "that starting again would replace; choose another --out")
    check_no_links(run)
    # A run stopped before its first checkpoint resumes from the start, with its config.
    resume = resume and last_path.exists()

    torch.manual_seed(cfg.seed)
    train_x, _ = load_split(cfg.dataset, cfg.train_split, cfg.data_dir, cfg.offline)
    val_x, _ = load_split(cfg.dataset, cfg.val_split, cfg.data_dir, cfg.offline)
    if len(val_x) < ctx.world:
        raise DgmError(f"validation split {cfg.val_split!r} has {len(val_x)} images, fewer than "
                       f"the {ctx.world} processes")
    if len(train_x) < cfg.batch_size:
        raise DgmError(f"training split {cfg.train_split!r} has {len(train_x)} images, fewer "
                       f"than one batch of {cfg.batch_size}; lower --batch-size")
    image_shape = tuple(train_x.shape[1:])  # (C, H, W): the data decide it, not the config
    if tuple(val_x.shape[1:]) != image_shape:
        raise DgmError(f"validation split {cfg.val_split!r} has images of shape "
                       f"{tuple(val_x.shape[1:])}, the training split {image_shape}")
    _warn_overlaps(cfg)
    train_x, val_x = train_x.to(device), val_x.to(device)

    model = build_model(model_name, cfg, image_shape).to(device)
    optimizers = model.configure_optimizers(cfg)
    data_gen = torch.Generator(device).manual_seed(cfg.seed)
    history, epoch, step = [], 0, 0

    lock = RunLock(run) if ctx.is_main else None
    if lock:
        remove_stale_temps(run)  # left by a process killed mid-write
    board = None
    try:
        if cfg.tensorboard and ctx.is_main:
            board = _tensorboard(run)
        if resume:
            ckpt = load_checkpoint(last_path, model_name, map_location=device)
            load_weights(model, ckpt, last_path)
            for name, opt in optimizers.items():
                opt.load_state_dict(ckpt["optimizers"][name])
            history, epoch, step = ckpt["history"], ckpt["epoch"], ckpt["step"]
            if cfg.epochs < epoch:
                raise DgmError(f"--epochs {cfg.epochs} is fewer than the {epoch} epochs {run} "
                               f"has already run; give --epochs {epoch} or more")
            data_gen.set_state(ckpt["rng"]["data"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if device.type == "cuda" and "cuda" in ckpt["rng"]:
                torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        if epoch == 0 and hasattr(model, "initialize"):
            # Data-dependent initialisation (the flow's ActNorm) from one batch that every
            # rank draws alike, with its own generator so that the data order is unchanged.
            init_gen = torch.Generator(device).manual_seed(cfg.seed + 2)
            idx = torch.randperm(len(train_x), generator=init_gen, device=device)
            model.initialize(model.prepare(train_x[idx[:cfg.batch_size]], init_gen))
        ctx.broadcast_module(model)
        ctx.sync_optimizers(optimizers)
        averaged = _averaged(model, cfg.ema, ckpt if resume else None, last_path)
        if ctx.is_main:
            save_config(run, model_name, cfg)
            write_metrics(run, history)  # drops rows of an epoch that never reached a checkpoint
        _loop(model_name, model, optimizers, cfg, run, train_x, val_x, data_gen, device, ctx,
              quiet, board, history, epoch, step, averaged)
        if ctx.is_main:
            try:
                write_report([run])
            except DgmError as e:  # a hand-edited file in the run; the training itself is done
                print(f"dgm: warning: no report written: {e}", file=sys.stderr)
    finally:
        if lock:
            lock.release()
        if board:
            board.close()
    return model, history


def _averaged(model, decay: float, ckpt: dict | None, path: Path) -> AveragedModel | None:
    """The exponential moving average of the weights (``--ema``), restored on resume."""
    if not decay:
        return None
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    if ckpt is not None:
        if "ema_state_dict" not in ckpt:
            raise DgmError(f"{path} was trained without --ema; resume it with --ema 0")
        averaged.load_state_dict(ckpt["ema_state_dict"])
    return averaged


def _seed_rank_noise(cfg, ctx, epoch: int) -> None:
    """Give each rank but the first its own stream of the model's noise (the VAE's eps, the
    GAN's z, diffusion's t and eps) for this epoch: from the one seed every rank would draw
    the same numbers for its different images, which is unbiased but noisier than one
    process with the whole batch. The stream comes from (seed, rank, epoch), so a resume at
    an epoch's checkpoint is exact; rank 0 keeps the checkpointed stream, a single process's."""
    if ctx.rank:
        seed = np.random.SeedSequence([cfg.seed, ctx.rank, epoch]).generate_state(1)[0]
        torch.manual_seed(int(seed))


def _loop(model_name, model, optimizers, cfg, run, train_x, val_x, data_gen, device, ctx, quiet,
          board, history, epoch, step, averaged=None):
    """Epoch 0's pictures, then train, validate, checkpoint and draw every epoch.

    With ``averaged`` (the weights' moving average) validation, the best checkpoint and
    the pictures use the averaged weights, which are what evaluation uses."""
    shown = averaged.module if averaged is not None else model
    threads = ThreadPolicy(cfg.threads if device.type == "cpu" else -1)
    try:
        # Validation images are prepared (binarised, dequantised) once, with a fixed seed, so
        # that validation numbers are comparable across epochs and runs.
        val_in = model.prepare(val_x, torch.Generator(device).manual_seed(cfg.seed + 1))
        if getattr(cfg, "compile", False):  # offered for flow and diffusion
            # training_step calls submodules directly (the GAN's two networks, the flow's
            # transform), so compile those rather than the wrapper's forward.
            for child in model.children():
                child.compile()
        if epoch == 0 and ctx.is_main:
            epoch_pictures(shown, cfg, run, 0)
        stop = _patience_spent(history, model.best_metric, cfg.patience)
        while epoch < cfg.epochs and not stop:
            t0 = time.perf_counter()
            _set_learning_rate(optimizers, cfg, epoch)
            _seed_rank_noise(cfg, ctx, epoch)
            stats, step = _train_epoch(model, optimizers, train_x, cfg, data_gen, device,
                                       epoch + 1, step, quiet, ctx, threads, averaged)
            # BatchNorm statistics are per rank (each saw its part of the batch): keep rank
            # 0's. Parameters stay identical without a copy (the same averaged gradients).
            ctx.broadcast_buffers(model)
            if averaged is not None and hasattr(shown, "refresh_statistics"):
                # Statistics of the averaged weights (the GAN's BatchNorm), from a generator of
                # their own, so that the data order and the noise stream stay as they were.
                shown.refresh_statistics(torch.Generator(device).manual_seed(cfg.seed + 3))
            if shown is not model:
                ctx.broadcast_buffers(shown)
            val = _validate(shown, val_in, cfg, device, ctx)
            epoch += 1
            row = {"epoch": epoch, "step": step, **stats, **val,
                   "time_s": round(time.perf_counter() - t0, 3)}
            history.append(row)
            stop = _patience_spent(history, model.best_metric, cfg.patience)
            samples = None
            if ctx.is_main:
                with interrupts.held():  # the checkpoint and the files that describe it
                    _save(run, model_name, model, optimizers, history, epoch, step, data_gen,
                          device, cfg, tuple(train_x.shape[1:]), averaged)
                    write_metrics(run, history)
                    plot_curves(history, model.curves, run / "curves.png",
                                title=f"{model_name} on {cfg.dataset}")
                    samples = epoch_pictures(shown, cfg, run, epoch, final=stop)
            if board:
                for k, v in row.items():
                    board.add_scalar(k, v, epoch)
                if samples is not None:
                    board.add_images("samples", samples, epoch)
                board.flush()
            if not quiet:
                line = "  ".join(f"{k} {v:.4g}" for k, v in row.items()
                                 if k not in ("epoch", "step"))
                tqdm.write(f"epoch {epoch}/{cfg.epochs}  {line}")
        if stop and epoch < cfg.epochs and not quiet:
            tqdm.write(f"stopped early: {model.best_metric[0]} has not improved for "
                       f"{cfg.patience} epochs (--patience)")
    except DiskFull as e:
        raise DiskFull(f"{e}, then continue with: dgm train {model_name} --resume {run} (from "
                       "the last checkpoint, which is intact)") from None
    except KeyboardInterrupt:
        saved = f"epoch {epoch} is saved" if epoch else "no epoch had finished"
        raise Interrupted(f"interrupted during epoch {epoch + 1}; {saved}; continue with: "
                          f"dgm train {model_name} --resume {run}") from None
    finally:
        threads.restore()


def _train_epoch(model, optimizers, train_x, cfg, data_gen, device, epoch, step, quiet,
                 ctx=None, threads=None, averaged=None):
    ctx = ctx or Context()
    model.train()
    n_batches = len(train_x) // cfg.batch_size  # drop the ragged last batch (BatchNorm, speed)
    perm = torch.randperm(len(train_x), generator=data_gen, device=device)
    mine = ctx.part(cfg.batch_size)  # equal parts: the batch divides by the world size
    sums: dict[str, torch.Tensor] = {}
    bar = tqdm(range(n_batches), desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
               disable=quiet or None, file=sys.stderr)
    for i in bar:
        idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
        # Every rank prepares the whole batch and keeps its part, so the random binarisation
        # or dequantisation equals a single process's.
        x = model.prepare(train_x[idx], data_gen)[mine]
        with autocast(device, cfg.precision):
            out = model.training_step(x, optimizers)
        for k, v in out.items():
            sums[k] = sums.get(k, 0) + v.detach().float()
        step += 1
        if averaged is not None:
            averaged.update_parameters(model)
        if threads:
            threads.update()
        # Checking finiteness syncs with the device (and the ranks), so only now and then.
        if i % 50 == 49 or i == n_batches - 1:
            means = {k: (ctx.sum(v.clone()) / ctx.world / (i + 1)).item() for k, v in sums.items()}
            bad = [k for k, v in means.items() if not math.isfinite(v)]
            if bad:
                kept = (f"the last good checkpoint (epoch {epoch - 1}) is kept" if epoch > 1
                        else "no epoch had finished")
                raise NonFiniteLoss(f"{bad[0]} became non-finite in epoch {epoch} (step {step}); "
                                    f"{kept}; start a new run (another --out) with a lower --lr "
                                    "or another --seed")
            bar.set_postfix({k: f"{v:.4g}" for k, v in means.items()}, refresh=False)
    return means, step


@torch.no_grad()
def _validate(model, val_in, cfg, device, ctx) -> dict[str, float]:
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    part = val_in[ctx.part(len(val_in))]
    bs = max(cfg.batch_size, 500)
    for start in range(0, len(part), bs):
        x = part[start:start + bs]
        with autocast(device, cfg.precision):
            out = model.validation_step(x)
        for k, v in out.items():
            sums[k] = sums.get(k, 0) + v.float() * len(x)
    return {k: (ctx.sum(v) / len(val_in)).item() for k, v in sums.items()}


def _warn_overlaps(cfg: TrainConfig) -> None:
    """Say so when the training, validation and test splits share images."""
    splits = {"training": cfg.train_split, "validation": cfg.val_split, "test": cfg.test_split}
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = split_overlap(cfg.dataset, splits[a], splits[b], cfg.data_dir, cfg.offline)
            if shared:
                print(f"dgm: warning: the {a} split {splits[a]!r} and the {b} split "
                      f"{splits[b]!r} share {shared} images; their metrics are not independent",
                      file=sys.stderr)


def _tensorboard(run: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DgmError("--tensorboard needs the tensorboard package; install it with "
                       "'pip install tensorboard', or leave out --tensorboard") from None
    return SummaryWriter(str(run / "tensorboard"))


def _save(run, model_name, model, optimizers, history, epoch, step, data_gen, device, cfg,
          image_shape, averaged=None):
    rng = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    payload = {
        "model": model_name,
        "config": dataclasses.asdict(cfg),
        "image_shape": list(image_shape),  # so the model is rebuilt without reading the data
        "epoch": epoch,
        "step": step,
        "state_dict": model.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
        "history": history,
        "rng": rng,
    }
    if averaged is not None:
        payload["ema_state_dict"] = averaged.state_dict()
    save_checkpoint(run / "checkpoints" / "last.pt", payload)
    key, mode = model.best_metric
    scores = [r[key] for r in history if r.get(key) is not None]
    if scores and history[-1].get(key) == (max(scores) if mode == "max" else min(scores)):
        save_checkpoint(run / "checkpoints" / "best.pt", payload)


@torch.no_grad()
def _set_learning_rate(optimizers: dict, cfg: TrainConfig, epoch: int) -> None:
    """The learning-rate schedule, set at the start of each epoch (0-based ``epoch``).

    ``base_lr`` is what a model's own per-step schedule (the flow's warm-up) scales."""
    if cfg.lr_schedule == "constant":
        return
    factor = 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))  # cosine, 1 -> near 0
    for opt in optimizers.values():
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["base_lr"] = group["initial_lr"] * factor


def _patience_spent(history: list[dict], best_metric: tuple[str, str], patience: int) -> bool:
    """Whether the last ``patience`` epochs all failed to improve on the best before them."""
    key, mode = best_metric
    scores = [r[key] for r in history if r.get(key) is not None]
    if not patience or len(scores) <= patience:
        return False
    before, recent = scores[:-patience], scores[-patience:]
    return max(recent) <= max(before) if mode == "max" else min(recent) >= min(before)

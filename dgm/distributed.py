"""Data-parallel training across processes started by ``torchrun``.

Each model owns its update rule and may have several optimisers (the GAN has
two), so rather than wrapping the model in DistributedDataParallel (whose
gradient hooks fire only through the wrapper's ``forward``), every optimiser
gets a step pre-hook that averages its gradients over all ranks in one
flattened all-reduce: the same arithmetic as DDP, for any ``training_step``.
A model that clips gradients inside ``training_step`` clips its rank's gradient
before the average; with the clip inactive (its usual state) this changes nothing.
"""

import contextlib
import datetime
import os
import re
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from dgm.errors import DgmError

__all__ = ["Context", "autocast", "cpu_has_native_bf16", "resolve_device", "resolve_precision",
           "setup"]


def resolve_device(name: str) -> torch.device:
    """The device that ``--device`` names: "auto" (a GPU where one is visible), "cpu", "cuda"."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DgmError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


class Context:
    """Rank, world size and the collective operations the trainer needs (no-ops on one rank)."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def part(self, n: int) -> slice:
        """This rank's contiguous part of n items, all items covered (sizes differ by <= 1)."""
        return slice(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's tensor along dim 0, in rank order, on every rank."""
        if self.world == 1:
            return t
        parts = [None] * self.world
        dist.all_gather_object(parts, t.cpu())
        return torch.cat(parts).to(t.device)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def sync_optimizers(self, optimizers: dict) -> None:
        if self.world == 1:
            return
        for opt in optimizers.values():
            opt.register_step_pre_hook(self._average_gradients)

    def _average_gradients(self, opt, args, kwargs) -> None:
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.world
        for g, avg in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(avg)

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Make every rank hold rank 0's parameters and buffers: once, after initialisation."""
        if self.world == 1:
            return
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, 0)

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Make every rank hold rank 0's buffers (BatchNorm running statistics), as DDP does.

        Parameters need no copy: every rank applies the same averaged gradients through the
        same optimiser, so they stay identical by construction, and copying them would hide a
        rank whose update went wrong."""
        if self.world == 1:
            return
        for t in module.buffers():
            dist.broadcast(t.data, 0)

    def barrier(self) -> None:
        """Wait for every rank: called once training or evaluation succeeded, so that no rank
        tears down the process group while a peer still uses it (gloo aborts that peer)."""
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: torch.device) -> tuple[Context, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Waits at most ``DGM_DIST_TIMEOUT`` seconds (default 300) for the other processes, then
    fails with a message that says who was waited for.
    """
    env = _torchrun_env()
    if env is None:
        return Context(), device
    rank, world, local_rank = env
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        timeout = _int_env("DGM_DIST_TIMEOUT", 300)
        if rank == 0:
            print(f"dgm: waiting up to {timeout} s for {world} processes at {where}",
                  file=sys.stderr)
        if rank != 0 and "TORCHELASTIC_RUN_ID" not in os.environ:
            # Under torchrun the agent's store is up before any rank starts; by hand, wait.
            _wait_for_rank0(rank, timeout)
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as e:  # torch's DistStoreError is a RuntimeError
            first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            raise DgmError(f"rank {rank} could not join {world} processes at {where} within "
                           f"{timeout} s ({first}); start every rank with torchrun "
                           "--nproc_per_node=N, or unset WORLD_SIZE to train alone") from None
    return Context(dist.get_rank(), dist.get_world_size()), device


def _wait_for_rank0(rank: int, timeout: int) -> None:
    """Wait until rank 0's store accepts connections, so that a missing rank 0 ends in one
    line rather than torch's C++ connection-retry log."""
    addr, port = os.environ["MASTER_ADDR"], _int_env("MASTER_PORT")
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((addr, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise DgmError(f"rank {rank} waited {timeout} s for rank 0 at {addr}:{port}, "
                               "which never answered; start every rank with torchrun "
                               "--nproc_per_node=N, or unset WORLD_SIZE to train alone") from None
            time.sleep(0.2)


def _int_env(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None and default is not None:
        return default
    try:
        return int(text)
    except (TypeError, ValueError):
        raise DgmError(f"environment variable {name}={text!r} is not an integer; torchrun sets "
                       "it: start dgm with torchrun, or unset it") from None


def _torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's variables; None when training alone."""
    if "WORLD_SIZE" not in os.environ:
        return None
    world = _int_env("WORLD_SIZE")
    if world == 1:
        return None
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if world < 1 or missing:
        why = f"is {world}" if world < 1 else f"is set but {', '.join(missing)} is not"
        raise DgmError(f"WORLD_SIZE {why}; start dgm with torchrun --nproc_per_node=N, "
                       "or unset WORLD_SIZE to train alone")
    rank, local_rank = _int_env("RANK"), _int_env("LOCAL_RANK", 0)
    _int_env("MASTER_PORT")
    if not 0 <= rank < world:
        raise DgmError(f"RANK {rank} is outside 0..{world - 1} (WORLD_SIZE {world}); start dgm "
                       "with torchrun, which sets both")
    return rank, world, local_rank


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``--precision bf16``: the networks' matrix products and convolutions
    run in bf16; each model takes its networks' outputs back to fp32 for what it cites (the
    flow's affine maps and log-determinants, the ELBO and IWAE sums, the GAN's losses)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX, from the kernel's CPU
    flags, or the text of a /proc/cpuinfo given); elsewhere bf16 is emulated and slower
    than fp32."""
    try:
        info = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", info) is not None


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision to run in on ``device``: fp32, or bf16 where the hardware has it natively
    (a GPU with bf16 support, a CPU with AVX512-BF16 or AMX). ``auto`` picks bf16 there and
    fp32 elsewhere, so that a recipe that asks for it runs on any machine; an explicit bf16
    where it would only be emulated is refused in one line."""
    if precision == "fp32":
        return precision
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        why = "needs a GPU with bf16 support, which this one lacks"
    else:
        native = cpu_has_native_bf16()
        why = ("on the CPU needs native bf16 (AVX512-BF16 or AMX), which this CPU lacks (it "
               "would be emulated, slower than fp32)")
    if precision == "auto":
        return "bf16" if native else "fp32"
    if not native:
        raise DgmError(f"--precision bf16 {why}; use --precision fp32 (or auto)")
    return precision

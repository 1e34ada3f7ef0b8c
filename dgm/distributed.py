"""Data-parallel training across processes started by ``torchrun``.

Each model owns its update rule and may have several optimisers (the GAN has
two), so rather than wrapping the model in DistributedDataParallel (whose
gradient hooks fire only through the wrapper's ``forward``), every optimiser
gets a step pre-hook that averages its gradients over all ranks in one
flattened all-reduce: the same arithmetic as DDP, for any ``training_step``.
A model that clips gradients inside ``training_step`` clips its rank's gradient
before the average; with the clip inactive (its usual state) this changes nothing.
"""

import os

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from dgm.errors import DgmError

__all__ = ["Context", "resolve_device", "setup"]


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
        """Make every rank hold rank 0's parameters and buffers (BatchNorm statistics too)."""
        if self.world == 1:
            return
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, 0)

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: torch.device) -> tuple[Context, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Context(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(dist.get_rank(), dist.get_world_size()), device

"""Run under torchrun by test_distributed.py: train, then save this rank's parameters.

With ``exact`` = "1" the randomness that is drawn per rank is made to equal a single
process's, so that N processes with 1/N of each batch must end where one process with the
whole batch ends, up to float rounding:

- the model's own noise (the VAE's reparameterisation eps, the GAN's z) comes from the
  global generator, which every rank seeds alike, so each rank would draw the *same*
  numbers for its half, where one process draws different numbers for its two halves.
  Here each such draw is made at the whole batch's size and the rank keeps its part;
  every rank then advances the generator as one process does.
- dropout (the GAN's discriminator) draws its mask the same way.
- BatchNorm (the GAN's generator) normalises with its rank's half batch, which one process
  with the whole batch legitimately does not (DDP without SyncBatchNorm does the same);
  here it is held in eval mode, a fixed affine map, so that the rest of the maths must agree.
- the flow's dequantisation noise needs nothing: the trainer prepares the whole batch on
  every rank from one generator and then slices it, and ActNorm is initialised from one
  batch that every rank draws alike.
- the trainer gives each rank but the first its own noise stream every epoch
  (dgm.train._seed_rank_noise); here that is switched off, so that all ranks keep the one
  generator that the slicing above needs.
- SGD replaces Adam, whose update hardly depends on the gradient's scale: with SGD a
  wrongly scaled average of the ranks' gradients shows.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import dgm.distributed
import dgm.models.flow
import dgm.models.gan
import dgm.models.vae
import dgm.train
from dgm.config import from_dict
from dgm.models import MODELS
from dgm.train import train

model_name, run, out, exact, options = sys.argv[1:]
rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))

if exact == "1":
    randn, randn_like, dropout = torch.randn, torch.randn_like, F.dropout

    def mine(full: torch.Tensor, n: int) -> torch.Tensor:
        return full[rank * n:(rank + 1) * n]  # the trainer's ctx.part for equal parts

    def sliced_randn(*size, generator=None, **kwargs):
        if generator is not None:  # fixed-noise pictures: drawn on rank 0 alone, untouched
            return randn(*size, generator=generator, **kwargs)
        size = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
        return mine(randn(size[0] * world, *size[1:], **kwargs), size[0])

    def sliced_randn_like(t, **kwargs):
        return mine(randn(len(t) * world, *t.shape[1:], dtype=t.dtype, device=t.device), len(t))

    def sliced_dropout(x, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return x
        keep = torch.empty(len(x) * world, *x.shape[1:], dtype=x.dtype, device=x.device)
        return x * mine(keep.bernoulli_(1 - p), len(x)) / (1 - p)

    torch.randn, torch.randn_like, F.dropout = sliced_randn, sliced_randn_like, sliced_dropout
    torch.nn.modules.batchnorm._BatchNorm.train = \
        lambda self, mode=True: torch.nn.Module.train(self, False)
    dgm.train._seed_rank_noise = lambda cfg, ctx, epoch: None
    for module in (dgm.models.vae, dgm.models.gan, dgm.models.flow):
        module.adam = lambda params, lr, betas=None: torch.optim.SGD(params, lr=lr)

else:
    # The ranks start from different weights, as with different seeds, so that only the
    # trainer's broadcast from rank 0 can make them equal (planted bug: a no-op broadcast).
    broadcast = dgm.distributed.Context.broadcast_module

    def perturbed_broadcast(self, module):
        gen = torch.Generator().manual_seed(100 + rank)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        broadcast(self, module)

    dgm.distributed.Context.broadcast_module = perturbed_broadcast

# The images each training step saw: for the flow, whose loss has no noise, every rank
# training on the whole batch would end where one process ends, and only this count shows it.
# And the state of the generator that the model's noise comes from, at each step.
seen, noise = [], []
step = MODELS[model_name].training_step


def counted_step(self, x, optimizers):
    seen.append(len(x))
    noise.append(torch.get_rng_state())
    return step(self, x, optimizers)


MODELS[model_name].training_step = counted_step
cfg = from_dict(model_name, json.loads(options))
model, _ = train(model_name, cfg, Path(run), quiet=True)
torch.save({**model.state_dict(), "images_seen": torch.tensor(seen),
            "noise_states": torch.stack(noise)},
           Path(out) / f"rank{rank}.pt")

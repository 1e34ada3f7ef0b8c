"""Run under torchrun by test_distributed.py: train, then save this rank's parameters."""

import json
import os
import sys
from pathlib import Path

import torch

from dgm.config import from_dict
from dgm.train import train

model_name, run, out, zero_noise, options = sys.argv[1:]
if zero_noise == "1":
    # The VAE's reparameterisation noise is drawn per rank and cannot match a single process's
    # draw; with it fixed at zero the rest of the maths must agree exactly.
    torch.randn_like = torch.zeros_like
    # Adam's update hardly depends on the gradient's scale; SGD's does, so a wrongly scaled
    # average of the ranks' gradients shows.
    import dgm.models.vae

    dgm.models.vae.adam = lambda params, lr, betas=None: torch.optim.SGD(params, lr=lr)
cfg = from_dict(model_name, json.loads(options))
model, _ = train(model_name, cfg, Path(run), quiet=True)
rank = int(os.environ.get("RANK", "0"))
torch.save(model.state_dict(), Path(out) / f"rank{rank}.pt")

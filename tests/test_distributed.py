"""Data-parallel training with torchrun: 2 gloo processes on the CPU."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgm.runs import read_metrics

WORKER = Path(__file__).with_name("ddp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc, model, run, out, options, exact=False):
    out.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", "--master_addr=127.0.0.1", str(WORKER), model,
            str(run), str(out), "1" if exact else "0", json.dumps(options)]
    path = os.pathsep.join([str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[:3000]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(nproc)]


def options(fake_data_dir, **extra):
    return {"dataset": "mnist", "data_dir": str(fake_data_dir), "offline": True,
            "train_split": "train[:128]", "val_split": "test[:64]", "epochs": 2,
            "batch_size": 32, "sample_epochs": [], **extra}


@pytest.mark.parametrize("model", ["vae", "gan", "gan-conv", "flow", "diffusion"])
def test_two_processes_keep_identical_parameters(fake_data_dir, tmp_path, model):
    """Ranks end identical with no parameter copied after the start, each having drawn its
    own noise. Planted bugs it catches: the gradient average removed; Context.
    broadcast_buffers doing nothing (the GAN's BatchNorm statistics differ by rank, each
    rank drawing its own z); every rank drawing the same noise (_seed_rank_noise a no-op);
    Context.broadcast_module doing nothing (the worker starts each rank from other weights)."""
    run = tmp_path / "run"
    extra = {"vae": {"hidden_dim": 32}, "gan": {},
             # Double backward (the penalties), spectral norm's power iteration, the average.
             "gan-conv": {"arch": "conv", "hidden_dim": 8, "loss": "wgan-gp",
                          "spectral_norm": True, "r1_weight": 1.0, "d_steps": 2, "ema": 0.9,
                          "minibatch_std": True},
             "flow": {"hidden_dim": 8, "num_couplings": 1, "num_scales": 1},
             "diffusion": {"channels": 8, "channel_mults": [1, 2], "sample_steps": 2}}[model]
    model = model.removesuffix("-conv")
    states = launch(2, model, run, tmp_path / "out", options(fake_data_dir, **extra))
    noise = [s.pop("noise_states") for s in states]
    assert all(not torch.equal(a, b) for a, b in zip(*noise, strict=True))  # every step
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=0, atol=0)
    # rank 0 alone wrote the run: one row per epoch, not one per rank
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


EXACT = {"vae": {"hidden_dim": 32, "lr": 0.01},
         "gan": {"lr": 0.05},
         # grad_clip 0: each rank clips its own gradient before the average (see
         # dgm/distributed.py), which differs from one process's clip wherever it bites.
         # warmup_steps 0: a warm-up over 200 steps would keep this short run's steps tiny.
         "flow": {"hidden_dim": 8, "num_couplings": 1, "num_scales": 1, "lr": 0.01,
                  "grad_clip": 0.0, "warmup_steps": 0}}


@pytest.mark.parametrize("model", ["vae", "gan", "flow"])
def test_two_half_batches_equal_one_full_batch(fake_data_dir, tmp_path, model):
    """Two processes with half of each batch end where one process with all of it ends.

    No parameters are copied between ranks after the start, so this holds only if the
    ranks' gradients are averaged and each rank trains on its own half. Planted bugs it
    catches: the gradient average removed (Context._average_gradients returning at once),
    and every rank training on the whole batch (``x = model.prepare(...)`` without
    ``[mine]`` in _train_epoch). The worker holds the per-rank noise to a single process's
    (see tests/ddp_worker.py) and uses SGD, so a wrongly scaled average shows too.
    """
    opts = options(fake_data_dir, **EXACT[model])
    one = launch(1, model, tmp_path / "a", tmp_path / "oa", opts, exact=True)[0]
    two = launch(2, model, tmp_path / "b", tmp_path / "ob", opts, exact=True)
    # 128 images in batches of 32, 2 epochs: 8 steps of 32 images alone, of 16 on each rank
    assert one.pop("images_seen").tolist() == [32] * 8
    assert [s.pop("images_seen").tolist() for s in two] == [[16] * 8] * 2
    for s in (one, *two):
        s.pop("noise_states")
    for k in one:
        torch.testing.assert_close(two[0][k], two[1][k], rtol=0, atol=0)
        torch.testing.assert_close(one[k], two[0][k], rtol=1e-4, atol=1e-5)
    ra, rb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    for key in ra[-1]:
        if key != "time_s":
            assert ra[-1][key] == pytest.approx(rb[-1][key], rel=1e-4, abs=1e-6), key


def torchrun_dgm(nproc, *argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(WORKER.parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "--master_addr=127.0.0.1", "-m", "dgm", *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[:3000]
    return proc.stdout


def test_evaluation_spread_over_two_processes(fake_data_dir, tmp_path):
    """Planted bug it catches: every rank scoring the first part of the images
    (``x[:len(x) // ctx.world]`` in evaluate_vae), which the image count and the former
    ``4 * sem + 1`` nats let through; the IWAE gap then exceeds its Monte-Carlo error."""
    from dgm.cli import main

    common = ["--dataset", "mnist", "--data-dir", str(fake_data_dir), "--offline",
              "--train-split", "train[:64]", "--val-split", "test[:32]", "--test-split",
              "test[32:]", "--epochs", "1", "--batch-size", "32", "--sample-epochs", "",
              "--quiet"]
    flow, vae = tmp_path / "flow", tmp_path / "vae"
    assert main(["train", "flow", "--out", str(flow), "--hidden-dim", "8", "--num-couplings",
                 "1", "--num-scales", "1", *common]) == 0
    assert main(["train", "vae", "--out", str(vae), "--hidden-dim", "16", *common]) == 0
    for run, extra in ((flow, []), (vae, ["--iw-samples", "50"])):
        assert main(["evaluate", str(run), "--json", *extra]) == 0
        [one] = json.loads((run / "evaluation.json").read_text()).values()
        out = torchrun_dgm(2, "evaluate", str(run), "--json", *extra)
        two = json.loads(out)  # rank 0 alone prints
        assert [two] == list(json.loads((run / "evaluation.json").read_text()).values())
        assert one["n_images"] == two["n_images"] == 96
        if run == flow:  # deterministic given the dequantisation: the same number
            assert two["log_px"]["log_px_nats"] == pytest.approx(one["log_px"]["log_px_nats"],
                                                                 rel=1e-5)
        else:
            # The same images, other noise draws per rank: the two means differ by
            # Monte-Carlo noise alone, each mean's being (per-image MC standard error) /
            # sqrt(n) for IWAE; the ELBO carries no MC error, and its standard error over
            # images (MC noise included) bounds it.
            n = one["n_images"]
            for key, mc in (("elbo", one["elbo"]["sem_nats"]),
                            ("iwae", one["iwae"]["mc_stderr_nats"] / n**0.5)):
                gap = abs(two[key]["log_px_nats"] - one[key]["log_px_nats"])
                assert gap < 3 * 2**0.5 * mc, (key, gap, mc)


def test_each_rank_noise_stream_is_its_own_and_reproducible():
    """Ranks > 0 reseed from (seed, rank, epoch) at each epoch, so a resume at an epoch's
    checkpoint draws what the uninterrupted run drew; rank 0 keeps its stream."""
    from types import SimpleNamespace

    from dgm.distributed import Context
    from dgm.train import _seed_rank_noise

    cfg = SimpleNamespace(seed=5)

    def first_draw(rank, epoch):
        torch.manual_seed(0)
        _seed_rank_noise(cfg, Context(rank, 4), epoch)
        return torch.randn(3)

    assert torch.equal(first_draw(1, 3), first_draw(1, 3))
    draws = [first_draw(r, e) for r in range(4) for e in range(3)]
    assert len({tuple(d.tolist()) for d in draws}) == len(draws) - 2  # rank 0: one stream
    torch.manual_seed(0)
    untouched = torch.randn(3)
    assert torch.equal(first_draw(0, 7), untouched)


def test_ranks_parts_tile_every_item_in_order():
    """Each rank's part of n items is contiguous, the parts cover range(n) once in rank
    order, and their sizes differ by at most one, also where the world does not divide n
    (planted bug: parts of n // world, which drop the remainder)."""
    from dgm.distributed import Context

    for n in (0, 1, 5, 96, 97, 1001):
        for world in (1, 2, 3, 4, 7):
            parts = [range(n)[Context(rank, world).part(n)] for rank in range(world)]
            assert [i for p in parts for i in p] == list(range(n)), (n, world)
            assert max(map(len, parts)) - min(map(len, parts)) <= 1, (n, world)

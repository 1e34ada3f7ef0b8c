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


def launch(nproc, model, run, out, options, zero_noise=False):
    out.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", "--master_addr=127.0.0.1", str(WORKER), model,
            str(run), str(out), "1" if zero_noise else "0", json.dumps(options)]
    path = os.pathsep.join([str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[:3000]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(nproc)]


def options(fake_data_dir, **extra):
    return {"dataset": "mnist", "data_dir": str(fake_data_dir), "offline": True,
            "train_split": "train[:128]", "val_split": "test[:64]", "epochs": 2,
            "batch_size": 32, "sample_epochs": [], **extra}


@pytest.mark.parametrize("model", ["vae", "gan", "flow", "diffusion"])
def test_two_processes_keep_identical_parameters(fake_data_dir, tmp_path, model):
    run = tmp_path / "run"
    extra = {"vae": {"hidden_dim": 32}, "gan": {},
             "flow": {"hidden_dim": 8, "num_couplings": 1, "num_scales": 1},
             "diffusion": {"channels": 8, "channel_mults": [1, 2], "sample_steps": 2}}[model]
    states = launch(2, model, run, tmp_path / "out", options(fake_data_dir, **extra))
    for k in states[0]:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=0, atol=0)
    # rank 0 alone wrote the run: one row per epoch, not one per rank
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def test_vae_two_half_batches_equal_one_full_batch(fake_data_dir, tmp_path):
    opts = options(fake_data_dir, hidden_dim=32)
    one = launch(1, "vae", tmp_path / "a", tmp_path / "oa", opts, zero_noise=True)[0]
    two = launch(2, "vae", tmp_path / "b", tmp_path / "ob", opts, zero_noise=True)[0]
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5)
    ra, rb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert ra[-1]["train_elbo"] == pytest.approx(rb[-1]["train_elbo"], rel=1e-4)
    assert ra[-1]["val_elbo"] == pytest.approx(rb[-1]["val_elbo"], rel=1e-4)


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
        else:  # other noise draws per rank: the same within a few standard errors
            for key in ("elbo", "iwae"):
                assert abs(two[key]["log_px_nats"] - one[key]["log_px_nats"]) < \
                    4 * one[key]["sem_nats"] + 1

"""Training time on a CPU that another process is using, by thread setting, in one run.

Two epochs of the report's VAE on Fashion-MNIST (54000 images), through ``dgm train`` in a
fresh process each time, timed by the epochs' own ``time_s`` (start-up excluded):

- alone, and beside one process that keeps a core busy (a Python busy loop), and beside one
  that keeps 80 % of a core busy (80 ms of work in every 100 ms);
- with ``--threads 0`` (dgm's automatic policy, the default), ``--threads N`` for N = the
  cores torch would use (torch's default), and ``--threads 1``.

Goal (issue 13): beside one busy process, the automatic policy takes at most 1.5x its idle
time, and alone it is at most 5 % slower than torch's default.

Run alone on an idle machine: DGM_DATA_DIR=../shared/data python benchmarks/bench_threads.py
"""

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SPIN = "while True: pass"
PARTIAL = ("import time\nwhile True:\n    t = time.perf_counter()\n"
           "    while time.perf_counter() - t < 0.08: pass\n    time.sleep(0.02)")


def epoch_seconds(threads: int, load: str | None, epochs: int, tmp: Path) -> float:
    """Seconds of ``epochs`` training epochs with ``--threads threads`` beside ``load``."""
    other = subprocess.Popen([sys.executable, "-c", load]) if load else None
    try:
        time.sleep(0.5)  # let the load start before dgm looks at it
        out = tmp / f"run-{threads}-{time.monotonic_ns()}"
        subprocess.run([sys.executable, "-m", "dgm", "train", "vae", "--dataset",
                        "fashion-mnist", "--offline", "--epochs", str(epochs), "--sample-epochs",
                        "", "--threads", str(threads), "--quiet", "--out", str(out)], check=True)
        with open(out / "metrics.csv") as f:
            return sum(float(r["time_s"]) for r in csv.DictReader(f))
    finally:
        if other:
            other.kill()
            other.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    full = torch.get_num_threads()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, torch default {full} threads, "
          f"{args.epochs} epochs of the report's VAE on Fashion-MNIST")
    settings = {"auto (--threads 0)": 0, f"torch default (--threads {full})": full,
                "--threads 1": 1}
    loads = {"idle": None, "one busy process": SPIN, "one process at 80 %": PARTIAL}
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'setting':28}" + "".join(f"{name:>22}" for name in loads))
        for label, threads in settings.items():
            row = [epoch_seconds(threads, load, args.epochs, Path(tmp)) for load in loads.values()]
            times[label] = row
            print(f"{label:28}" + "".join(f"{t:>21.1f}s" for t in row), flush=True)
    auto, default = times["auto (--threads 0)"], times[f"torch default (--threads {full})"]
    print(f"auto alone / torch default alone: {auto[0] / default[0]:.3f} (goal <= 1.05)")
    for i, name in enumerate(loads):
        if i:
            print(f"auto beside {name} / auto alone: {auto[i] / auto[0]:.2f} (goal <= 1.5); "
                  f"torch default: {default[i] / default[0]:.2f}")


if __name__ == "__main__":
    main()

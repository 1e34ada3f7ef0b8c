"""Start-up time of the command line: `dgm --help` and `dgm train vae --help`.

    python benchmarks/bench_startup.py              # this checkout
    python benchmarks/bench_startup.py --ref 5c75585 # and an older commit, side by side

Each command runs 7 times in a fresh interpreter; the median wall time is printed.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = (["--help"], ["train", "vae", "--help"])


def median_seconds(package_root: Path, argv: list[str], repeats: int = 7) -> float:
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dgm", *argv], env=env, check=True,
                       stdout=subprocess.DEVNULL, cwd=tempfile.gettempdir())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ref", help="also time the dgm package of this git commit")
    args = parser.parse_args()
    roots = {"this checkout": ROOT}
    with tempfile.TemporaryDirectory() as old:
        if args.ref:
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.ref, "dgm"],
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
            roots = {args.ref: Path(old), **roots}
        for name, root in roots.items():
            for argv in COMMANDS:
                print(f"{name:>14}  dgm {' '.join(argv):<18} "
                      f"{median_seconds(root, argv):.3f} s (median of 7)")


if __name__ == "__main__":
    main()

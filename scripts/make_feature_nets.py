"""Make the feature networks that ship with dgm (dgm/weights/), bit for bit.

    DGM_DATA_DIR=../shared/data python scripts/make_feature_nets.py [DATASET ...] [--out DIR]

Trains each network with dgm.features.Recipe() on one thread, writes
``DIR/<name>.bin`` (default: dgm/weights/) and prints its SHA-256 and test accuracy
beside the ones recorded in dgm/features.py. Exits 1 when a hash differs: another CPU or
torch version can round differently, and then the shipped file, not this one, is the
feature space that dgm's scores are measured in.
"""

import argparse
import hashlib
import sys
import time
from pathlib import Path

import torch

from dgm.data import load_split
from dgm.features import (
    SHIPPED,
    WEIGHTS_DIR,
    Recipe,
    accuracy,
    load_weights,
    train_feature_net,
    weights_bytes,
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datasets", nargs="*", help=f"some of {', '.join(SHIPPED)} (default: all)")
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    args = p.parse_args()
    unknown = set(args.datasets) - set(SHIPPED)
    if unknown:
        p.error(f"no shipped feature network for {', '.join(sorted(unknown))}")
    # One thread: a multi-threaded reduction may add in another order on another run.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    same = True
    for dataset in args.datasets or SHIPPED:
        spec = SHIPPED[dataset]
        t0 = time.perf_counter()
        x, y = load_split(dataset, spec.train_split)
        data = weights_bytes(train_feature_net(x, y, Recipe(), quiet=False))
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"{spec.name}.bin"
        path.write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        net, _ = load_weights(path, digest)
        test_x, test_y = load_split(dataset, spec.test_split)
        acc = accuracy(net, test_x, test_y)
        match = digest == spec.sha256 and round(acc, 4) == round(spec.test_accuracy, 4)
        same &= match
        print(f"{spec.name}: {len(data)} bytes, {time.perf_counter() - t0:.0f} s\n"
              f"  made:     sha256 {digest}  accuracy on {spec.test_split} {acc:.4f}\n"
              f"  recorded: sha256 {spec.sha256 or '(none)'}  accuracy {spec.test_accuracy:.4f}"
              f"\n  {'the same' if match else 'DIFFERENT'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

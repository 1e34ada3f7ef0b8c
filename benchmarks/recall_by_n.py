"""Recall and the samples' k-NN radius as the number of samples grows (BENCHMARKS.md,
"Where the recall goes"): a sampler with the data's spread keeps its recall as n grows,
one on a thinner set than the data's loses it, and the radius's fall with n gives the
set's local dimension d (radius ~ n^(-1/d)).

    export DGM_DATA_DIR=../shared/data
    python benchmarks/recall_by_n.py zoo:gan-fashion-mnist RUN ... [--threads 1]
"""

import argparse
import math

import torch

from dgm.data import load_split
from dgm.evaluate import load_model
from dgm.features import extract_features, shipped_feature_net
from dgm.quality import draw_samples, inside_manifold, kth_neighbour_radii
from dgm.zoo import open_run

NS = (1250, 2500, 5000, 10000, 20000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--checkpoint", default="best", choices=("best", "last"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    net, _ = shipped_feature_net(args.dataset)
    test = extract_features(net, load_split(args.dataset, "test")[0]).double()
    print("run | " + " | ".join(f"n={n}: radius, recall" for n in NS) + " | local dimension")
    for run in args.runs:
        with open_run(run) as folder:  # a run folder, zoo:NAME or a packed file
            _, _, model, _ = load_model(folder, args.checkpoint, "cpu")
        with torch.no_grad():
            fakes = draw_samples(model.sample, max(NS), torch.Generator().manual_seed(args.seed))
        feats = extract_features(net, fakes).double()
        radii, cells = [], []
        for n in NS:
            r = kth_neighbour_radii(feats[:n], 3)
            radii.append(r.median().item())
            recall = inside_manifold(test, feats[:n], r).double().mean().item()
            cells.append(f"{radii[-1]:.2f}, {recall:.3f}")
        d = -math.log(NS[-1] / NS[0]) / math.log(radii[-1] / radii[0])
        print(f"{run} | " + " | ".join(cells) + f" | {d:.1f}", flush=True)


if __name__ == "__main__":
    main()

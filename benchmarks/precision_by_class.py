"""Where a run's imprecise samples are: precision (Kynkaanniemi et al.'s, k = 3, as
`dgm evaluate` scores it) per class that the feature network's own head gives each sample,
per band of its confidence, and pixel statistics of samples against test images.

    taskset -c 0 python benchmarks/precision_by_class.py RUN [-n 10000] [--temperature T]

The samples are `dgm evaluate`'s (seed 1234) for Fashion-MNIST runs; one thread.
"""

import argparse

import torch

from dgm.data import load_split
from dgm.evaluate import load_model, set_sampling
from dgm.features import extract_features, shipped_feature_net
from dgm.quality import draw_samples, inside_manifold, kth_neighbour_radii


def pixel_stats(x: torch.Tensor) -> str:
    return (f"mean {x.mean():.3f}, under 0.02 {(x < 0.02).float().mean():.3f}, above 0.98 "
            f"{(x > 0.98).float().mean():.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("-n", type=int, default=10000)
    p.add_argument("--temperature", type=float)
    a = p.parse_args()
    torch.set_num_threads(1)
    name, _, model, _ = load_model(a.run, "last", "cpu")
    set_sampling(model, name, a.run, temperature=a.temperature)
    net, _ = shipped_feature_net("fashion-mnist")
    x, _ = load_split("fashion-mnist", "test")
    real = x.float() / 255
    fake = draw_samples(lambda n, g: model.sample(n, generator=g), a.n,
                        torch.Generator().manual_seed(1234))
    with torch.no_grad():
        fr, ff = (extract_features(net, t).double() for t in (real, fake))
        probs = net.double().head(ff).softmax(1)
    inside = inside_manifold(ff, fr, kth_neighbour_radii(fr, 3)).double()
    label, conf = probs.argmax(1), probs.max(1).values
    print(f"precision {inside.mean():.3f} over {a.n} samples")
    print("| class | samples | precision | mean confidence |\n| --- | ---: | ---: | ---: |")
    for c in range(probs.shape[1]):
        m = label == c
        print(f"| {c} | {int(m.sum())} | {inside[m].mean():.3f} | {conf[m].mean():.3f} |")
    for lo, hi in ((0, 0.5), (0.5, 0.9), (0.9, 0.99), (0.99, 1.01)):
        m = (conf >= lo) & (conf < hi)
        print(f"confidence in [{lo}, {min(hi, 1)}): {int(m.sum())} samples, precision "
              f"{inside[m].mean():.3f}")
    print(f"pixels of the test images: {pixel_stats(real)}\npixels of the samples: "
          f"{pixel_stats(fake)}")


if __name__ == "__main__":
    main()

#!/bin/bash
# A GAN pilot of BENCHMARKS.md, "GAN: one change at a time": 360 s of training on one
# thread pinned to core 1, then the scores of the last checkpoint (10000 samples).
#   DGM_DATA_DIR=../shared/data benchmarks/gan_pilot.sh NAME [dgm train gan flags...]
# Writes runs/NAME/ and runs/NAME.eval.json.
name=$1; shift
start=$(date +%s)
nice -n 5 timeout 360 taskset -c 1 dgm train gan --dataset fashion-mnist --threads 1 \
    --epochs 1000 --sample-epochs 0 --quiet --out "runs/$name" "$@"
echo "train rc $? wall $(( $(date +%s) - start )) s"
start=$(date +%s)
nice -n 5 taskset -c 1 dgm evaluate "runs/$name" --checkpoint last --json --quiet \
    --device cpu > "runs/$name.eval.json"
echo "eval rc $? wall $(( $(date +%s) - start )) s"
python - "$name" <<'PY'
import csv, json, sys
name = sys.argv[1]
r = json.load(open(f"runs/{name}.eval.json"))
rows = list(csv.DictReader(open(f"runs/{name}/metrics.csv")))
pr = r["precision_recall"]
print(f"{name}: {len(rows)} epochs, s/epoch {[round(float(x['time_s'])) for x in rows]}, "
      f"Frechet {r['frechet']['distance']:.2f} ({r['frechet']['real_reference']:.2f}), "
      f"precision {pr['precision']:.4f} ({pr['real_precision']:.4f}), "
      f"recall {pr['recall']:.4f} ({pr['real_recall']:.4f})")
PY

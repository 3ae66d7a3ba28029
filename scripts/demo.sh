#!/usr/bin/env bash
# The main job on the embedded default: set everything up from python3 alone, build the synthetic
# shapes captioning dataset, train LaDiC on it (CPU, minutes), evaluate at 5 and 30 denoising steps,
# print a few captions and write a sheet of test images with their generated captions.
#
#   scripts/demo.sh                  # everything, into runs/demo (resumes if interrupted)
#   WORKDIR=/tmp/x scripts/demo.sh --config.total_steps=500    # extra args go to ladic-train
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup_env.sh"
cd "$repo"
# The demo is sized for a CPU. With the tpu extra installed, JAX would otherwise look for a TPU in every
# command (and libtpu warn that it finds none); JAX_PLATFORMS=tpu scripts/demo.sh uses one.
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
data="${DATA_DIR:-$repo/data}"
workdir="${WORKDIR:-$repo/runs/demo}"
t0=$(date +%s)

echo "== 1/4 dataset: shapes_captions into $data"
ladic-data build shapes_captions --data_dir "$data"

echo "== 2/4 training LaDiC (configs/ladic_shapes.py) in $workdir"
ladic-train --config configs/ladic_shapes.py --workdir "$workdir" --config.input.data_dir="$data" "$@"

echo "== 3/4 evaluation on the test split (5 and 30 denoising steps)"
ladic-eval --workdir "$workdir" --sampling-steps 5,30

echo "== 4/4 captions"
python - "$workdir" <<'PY'
import glob, json, os, sys
workdir = sys.argv[1]
files = sorted(glob.glob(os.path.join(workdir, "eval", "step_*_captions.jsonl")), key=os.path.getmtime)
recs = [json.loads(l) for l in open([f for f in files if "_s" not in os.path.basename(f)][-1])]
for r in recs[:8]:
    print(f"image {r['image_id']}: {r['caption']!r}\n    reference: {r['references'][0]!r}")
PY
captions=$(ls -t "$workdir"/eval/step_*_captions.jsonl | grep -v '_s[0-9]' | head -1)
ladic-data show --dataset shapes_captions --split test --data_dir "$data" --captions "$captions" \
  --out "$workdir/sheet.png" --num 16
echo "sheet of test images with generated captions: $workdir/sheet.png"
echo "metrics: $workdir/eval/metrics.txt, plot: $workdir/eval/metrics.png"
echo "demo finished in $(( $(date +%s) - t0 )) s"

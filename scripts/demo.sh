#!/usr/bin/env bash
# The main job on the embedded default: set everything up from python3 alone, build the synthetic shapes
# captioning dataset, pretrain the shapes vision-language model (configs/coca_shapes.py: contrastive +
# captioning), export its image tower, train LaDiC on it with that tower frozen (as the paper freezes BLIP's
# ViT), evaluate LaDiC at 5 and 30 denoising steps and the vision-language model's own autoregressive
# captioner (greedy) on the test split, print a comparison table and captions, and write caption sheets.
#
#   scripts/demo.sh                  # everything, into runs/demo; re-running reuses finished stages
#   WORKDIR=/tmp/x scripts/demo.sh --config.total_steps=500    # extra args go to the LaDiC ladic-train
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/scripts/setup_env.sh"
cd "$repo"
# The demo is sized for a CPU. With the tpu extra installed, JAX would otherwise look for a TPU in every
# command (and libtpu warn that it finds none); JAX_PLATFORMS=tpu scripts/demo.sh uses one.
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
data="${DATA_DIR:-$repo/data}"
workdir="${WORKDIR:-$repo/runs/demo}"
coca="$workdir/coca"
clip="$workdir/clip"
ladic="$workdir/ladic"
t0=$(date +%s)
stage() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }

stage "1/6 dataset: shapes_captions into $data"
ladic-data build shapes_captions --data_dir "$data"

stage "2/6 pretraining the shapes vision-language model (configs/coca_shapes.py) in $coca"
ladic-train --config configs/coca_shapes.py --workdir "$coca" --config.input.data_dir="$data"

stage "3/6 exporting its towers in the Hugging Face CLIP layout to $clip"
if [ -f "$clip/model.safetensors" ] && [ "$clip/model.safetensors" -nt "$coca/checkpoints" ]; then
  echo "already exported"
else
  ladic-convert clip --workdir "$coca" --out "$clip"
fi

stage "4/6 training LaDiC with the pretrained image tower frozen (configs/ladic_shapes.py:tower=...) in $ladic"
ladic-train --config "configs/ladic_shapes.py:tower=$clip" --workdir "$ladic" --config.input.data_dir="$data" "$@"

stage "5/6 comparison on the test split (LaDiC at 5 and 30 steps, the autoregressive captioner, greedy)"
ladic-eval --compare "$ladic" "$ladic:_s30" "$coca"

stage "6/6 captions"
python - "$ladic" "$coca" <<'PY'
import sys
from ladic_jax.evaluation import report
ladic, coca = sys.argv[1:]
diffusion = report.read_captions(ladic, report.latest_eval(ladic)["step"])
ar = {r["image_id"]: r for r in report.read_captions(coca, report.latest_eval(coca)["step"])}
for r in diffusion[:8]:
    print(f"image {r['image_id']}:\n    LaDiC (5 steps): {r['caption']!r}  [{r.get('semantic', '-')}]"
          f"\n    autoregressive:  {ar[r['image_id']]['caption']!r}  [{ar[r['image_id']].get('semantic', '-')}]"
          f"\n    reference:       {r['references'][0]!r}")
PY
for run in "$ladic" "$coca"; do
  step=$(python -c "from ladic_jax.evaluation import report; print(report.latest_eval('$run')['step'])")
  ladic-data show --dataset shapes_captions --split test --data_dir "$data" \
    --captions "$run/eval/step_${step}_captions.jsonl" --out "$run/sheet.png" --num 16
done
echo "sheets of test images with generated captions: $ladic/sheet.png (LaDiC), $coca/sheet.png (autoregressive)"
echo "metrics: $ladic/eval/metrics.txt, $coca/eval/metrics.txt; plots: */eval/metrics.png"
echo "demo finished in $(( $(date +%s) - t0 )) s"

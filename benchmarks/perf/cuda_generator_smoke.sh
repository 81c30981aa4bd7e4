#!/usr/bin/env bash
# One iteration of each recipe whose random choices come from the training context's generators, on a
# CUDA device (the generators live on the model's device): DMD's backward-simulation step, AlignProp's
# window, GRPO's shifted SDE window and trained-step subset, online DPO's pair order.
#   bash benchmarks/perf/cuda_generator_smoke.sh OUT_DIR
set -u
out=${1:-runs/cuda_smoke}
common="train.steps=1 train.log_with=[] train.progress=false train.checkpoint_every=0 train.overwrite=true"
status=0
run() {
  name=$1; shift
  if python3 -m flowalign train "$@" $common train.output_dir="$out/$name" > "$out/$name.log" 2>&1; then
    echo "ok    $name"
  else
    echo "FAIL  $name"; tail -3 "$out/$name.log"; status=1
  fi
}
mkdir -p "$out"
run dmd_tiny_sd3 configs/dmd/tiny_sd3.yaml
run dmd_tiny_sd configs/dmd/tiny_sd.yaml
run alignprop_shapes configs/backprop/shapes_alignprop.yaml eval.prompts=null
run grpo_window configs/grpo/tiny_sd3.yaml sampling.sde_window=[0,2] sampling.sde_window_shift=1 sampling.train_steps=1
run dpo_online configs/dpo/tiny_sd3_online.yaml
exit $status

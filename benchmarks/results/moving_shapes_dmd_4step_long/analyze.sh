#!/bin/bash
# The readings of results.md, from the repository root with the venv active: bash benchmarks/results/moving_shapes_dmd_4step_long/analyze.sh
export HF_HUB_OFFLINE=1
R=benchmarks/results/moving_shapes_dmd_4step_long
C=benchmarks/results/moving_shapes_dmd_4step
T=$R/teacher_10step_g1.5
for g in 1.0 1.5; do
  [ -d $R/teacher_4step_g$g ] || flowalign bench video --model moving_shapes --prompts assets/moving_shapes/prompts/test.jsonl --videos-per-prompt 4 --steps 4 --guidance $g --seed 0 --no-progress --out $R/teacher_4step_g$g > /dev/null 2>&1
done
for n in ms_dmd4_long ms_dmd4_long_seed1; do
  for s in 300 600; do
    [ -d $R/$n/step$s ] && flowalign bench compare --across-samplers $T $R/$n/step$s --out $R/$n/step${s}_vs_teacher > /dev/null
  done
  flowalign bench compare $R/$n/step300 $R/$n/step600 --out $R/$n/step600_vs_step300 > /dev/null
done
flowalign bench compare $C/student_4step $R/ms_dmd4_long/step300_vpp1 --out $R/ms_dmd4_long/step300_vpp1_vs_committed > /dev/null
flowalign bench compare $C/student_4step_seed1 $R/ms_dmd4_long_seed1/step300_vpp1 --out $R/ms_dmd4_long_seed1/step300_vpp1_vs_committed > /dev/null
{
python benchmarks/video/seed_pooled.py --students $R/ms_dmd4_long/step600 $R/ms_dmd4_long_seed1/step600 --references $T $R/teacher_4step_g1.5 $R/teacher_4step_g1.0
python benchmarks/video/seed_pooled.py --students $R/ms_dmd4_long/step300 $R/ms_dmd4_long_seed1/step300 --references $T
python benchmarks/video/seed_pooled.py --pair $R/ms_dmd4_long/step300 $R/ms_dmd4_long/step600 --pair $R/ms_dmd4_long_seed1/step300 $R/ms_dmd4_long_seed1/step600
} > $R/pooled.txt

#!/bin/bash
# The runs behind the report in docs/: every variant but ttd (no teacher offline), 3 seeds,
# the embedded default model, on 100 BFCL `multiple` inputs and 50 `simple_python` ones.
# Each run resumes after its last finished wave, so this script can be stopped and started again.
#   RUNS=docs/runs bash docs/runs/run.sh    (workdirs under $RUNS, default runs/: with docs/runs
#                                            the records land here, wave by wave)
# Then: python -m ttsi_jax.report --workdir=runs/multiple100/s0,runs/multiple100/s1,runs/multiple100/s2
set -u
RUNS=${RUNS:-runs}
PYTHON=${PYTHON:-python}
VARIANTS=base,ttsi,self_label,ttsi_icl,all_inputs,certain_only,oracle,sft
run() {  # name seed category num_examples (variants: $VARIANTS)
  local workdir=$RUNS/$1/s$2
  mkdir -p "$workdir"
  nice -n 10 "$PYTHON" -m ttsi_jax.main --config=configs/default.py --workdir="$workdir" \
      --config.seed="$2" --config.task.category="$3" --config.task.num_examples="$4" \
      --config.wave_size=10 --config.variants="$VARIANTS" >> "$workdir.log" 2>&1
}
for seed in 0 1 2; do run simple50 $seed simple_python 50; done
for seed in 0 1 2; do run multiple100 $seed multiple 100; done
# In-context examples only (no training): the self-written pairs against the training split's
# nearest gold calls (ordinary ICL).
for seed in 0 1 2; do VARIANTS=base,ttsi_icl,icl run icl100 $seed multiple 100; done

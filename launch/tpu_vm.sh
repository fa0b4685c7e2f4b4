#!/usr/bin/env bash
# Runs the TT-SI main job on a Cloud TPU VM (single host or a multi-host slice).
#
# Usage: launch/tpu_vm.sh [--dry-run] {create|setup|run|collect|delete|all}
#   --dry-run   print the exact commands instead of running them
#
# Settings (environment variables):
#   TPU_NAME, TPU_ZONE, TPU_TYPE (e.g. v5litepod-16), TPU_PROJECT     required
#   TPU_RUNTIME   TPU VM software version        (default: v2-alpha-tpuv5-lite)
#   CONFIG        config file                    (default: configs/default.py)
#   WORKDIR       workdir on the TPU VM, absolute or in the repo's copy there (default: workdir/tpu)
#   RESULTS       local folder for collect       (default: results/$TPU_NAME; relative: in the
#                 repo; the workdir lands in it)
#   EXTRA_ARGS    extra flags for ttsi_jax.main  (e.g. "--config.task.num_examples=0")
set -euo pipefail

usage() {
  echo "usage: $0 [--dry-run] {create|setup|run|collect|delete|all}" >&2
  exit 2
}

# shellcheck source=launch/_lib.sh
source "$(dirname "$0")/_lib.sh"
parse_args "$@"

TPU_RUNTIME="${TPU_RUNTIME:-v2-alpha-tpuv5-lite}"
CONFIG="${CONFIG:-configs/default.py}"
WORKDIR="${WORKDIR:-workdir/tpu}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
REMOTE_DIR="ttsi_jax"

require() {
  local name
  for name in "$@"; do
    if [[ -z "${!name:-}" ]]; then
      echo "error: $name is not set (required settings: TPU_NAME TPU_ZONE TPU_TYPE TPU_PROJECT)" >&2
      exit 2
    fi
  done
}

tpu() {
  run gcloud compute tpus tpu-vm "$@" --zone="$TPU_ZONE" --project="$TPU_PROJECT"
}

on_all_workers() {
  tpu ssh "$TPU_NAME" --worker=all --command="$1"
}

create() {
  tpu create "$TPU_NAME" --accelerator-type="$TPU_TYPE" --version="$TPU_RUNTIME"
}

setup() {
  # The files git tracks or would track (uncommitted edits and new configs included; nothing it
  # ignores), unpacked over the VM's copy so its workdir survives a second setup.
  local archive="/tmp/${TPU_NAME}-ttsi_jax.tar.gz"
  # shellcheck disable=SC2016  # $0 is expanded by the inner bash
  run bash -c 'git ls-files -z --cached --others --exclude-standard | tar czf "$0" --null -T -' \
    "$archive"
  tpu scp "$archive" "$TPU_NAME:~/ttsi_jax.tar.gz" --worker=all
  on_all_workers "mkdir -p $REMOTE_DIR && tar xzf ttsi_jax.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR \
&& { $MAKE_VENV; } && .venv/bin/$PIP_INSTALL_TTSI 'jax[tpu]' \
&& .venv/bin/pip install -q --no-deps -r data-packages.txt"
}

still_running() {
  echo "error: a step failed; the TPU VM $TPU_NAME is still running (and billing). Inspect it," \
    "fetch its finished waves ($0 collect), then delete it: $0 delete" >&2
}

run_job() {
  # Every worker runs the same command; jax.distributed.initialize() joins them into one job,
  # each worker runs its share of the waves and worker 0 writes the gathered results.
  on_all_workers "cd $REMOTE_DIR && .venv/bin/python -m ttsi_jax.main --config=$CONFIG \
--workdir=$WORKDIR --distributed $EXTRA_ARGS"
}

collect() {
  local results="${RESULTS:-results/$TPU_NAME}"
  run mkdir -p "$results"
  # Worker 0's whole workdir (records, metrics, config, kept adapters): `all` deletes the VM next.
  local source
  source=$(remote_path "$WORKDIR")
  # shellcheck disable=SC2088  # ~ is the VM's home, expanded there
  [[ "$source" == /* ]] || source="~/$source"
  tpu scp --recurse "$TPU_NAME:$source" "$results/" --worker=0
}

delete() {
  tpu delete "$TPU_NAME" --quiet
}

case "$STEP" in
  create | setup | collect | delete)
    require TPU_NAME TPU_ZONE TPU_TYPE TPU_PROJECT
    "$STEP"
    ;;
  run)
    require TPU_NAME TPU_ZONE TPU_TYPE TPU_PROJECT
    run_job
    ;;
  all)
    require TPU_NAME TPU_ZONE TPU_TYPE TPU_PROJECT
    create
    trap 'if (( $? )); then still_running; fi' EXIT
    setup
    run_job
    collect
    trap - EXIT
    delete
    ;;
  *) usage ;;
esac

# Shared by the launch scripts (sourced): --dry-run handling and the command runner.
# shellcheck shell=bash

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
fi

# Runs a command, or prints it (shell-quoted, one line) under --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

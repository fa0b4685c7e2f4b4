# Shared by the launch scripts (sourced): argument parsing, the command runner, the install line.
# shellcheck shell=bash

# torch (CPU build) is needed by transformers to read the tokenizer of a GGUF model such as the default.
# shellcheck disable=SC2034  # used by the scripts that source this file
PIP_INSTALL_TTSI="pip install -q -e '.[hf]' --extra-index-url https://download.pytorch.org/whl/cpu"

# Sets DRY_RUN (0/1) and STEP from the command line: --dry-run anywhere, exactly one step.
parse_args() {
  DRY_RUN=0
  STEP=""
  local arg
  for arg in "$@"; do
    case "$arg" in
      --dry-run) DRY_RUN=1 ;;
      -*)
        echo "error: unknown option $arg" >&2
        usage
        ;;
      *)
        if [[ -n "$STEP" ]]; then
          echo "error: one step at a time (got $STEP and $arg)" >&2
          usage
        fi
        STEP="$arg"
        ;;
    esac
  done
}

# Runs a command, or prints it (shell-quoted, one line) under --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

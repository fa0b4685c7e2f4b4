# Shared by the launch scripts (sourced): argument parsing, the command runner, the install line.
# shellcheck shell=bash

# torch (CPU build) is needed by transformers to read the tokenizer of a GGUF model such as the default.
# shellcheck disable=SC2034  # used by the scripts that source this file
PIP_INSTALL_TTSI="pip install -q -e '.[hf]' --extra-index-url https://download.pytorch.org/whl/cpu"

# Makes .venv with Python >= 3.11 (setup.py's floor, and jax's), run on the remote machine: its
# python3 where that is new enough, else python3.11 from apt (the TPU VM images, Ubuntu 22.04,
# ship 3.10).
# shellcheck disable=SC2016,SC2034  # $py is the remote shell's; used by the scripts that source this
MAKE_VENV='py=python3; if ! python3 -c "import sys; sys.exit(sys.version_info < (3, 11))"; then sudo apt-get -qq update && sudo DEBIAN_FRONTEND=noninteractive apt-get -qq install -y python3.11 python3.11-venv && py=python3.11 || exit 1; fi; $py -m venv .venv'

# A path on the remote machine as its shell and rsync / scp read it: an absolute one as it is, else
# under the remote copy of the repo (REMOTE_DIR, in the login's home).
remote_path() {
  case "$1" in
    /*) printf '%s' "$1" ;;
    *) printf '%s' "$REMOTE_DIR/$1" ;;
  esac
}

# The commands read the repo's files (rsync, git ls-files, the configs) from its root.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

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

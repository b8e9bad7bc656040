# Helpers shared by launch/xpk.sh and launch/slurm.sh (sourced, not run).
# They read DRY_RUN (1: print commands instead of running them).

die() { echo "error: $*" >&2; exit 2; }

need() {  # need TOOL HOW-TO-INSTALL: one error line if TOOL is missing (not in a dry run)
  [[ ${DRY_RUN:-0} == 1 ]] || command -v "$1" >/dev/null ||
    die "$1 not found on PATH: $2"
}

run() {  # prints the command in a dry run, runs it otherwise
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

usage() {  # the comment block at the top of the script that sourced this file
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

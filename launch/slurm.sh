#!/usr/bin/env bash
# Submit launch/slurm.sbatch with the cluster shape as flags.
#
#   launch/slurm.sh submit --nodes=2 [--gpus_per_node=8] [--per_gpu] [--partition=P] \
#       [--account=A] [--time=24:00:00] [--dry_run] \
#       -- --config=configs/imagenet_vit_b16.py --workdir=/shared/runs/b16
#   launch/slurm.sh status [JOBID]      # squeue for your jobs
#   launch/slurm.sh cancel JOBID        # scancel: the trainer saves a checkpoint first
#
# --per_gpu: one process per GPU instead of one per node. Logs: mrl_jax-JOBID.out
# in the submit directory, each line prefixed by its task number.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0

die() { echo "error: $*" >&2; exit 2; }
need() { [[ $DRY_RUN == 1 ]] || command -v "$1" >/dev/null || die "$1 not found on PATH: run this on a SLURM login node (SLURM's client commands: sbatch, squeue, scancel)."; }
run() {
  if [[ $DRY_RUN == 1 ]]; then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi
}
usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

[[ $# -gt 0 ]] || { usage; exit 2; }
COMMAND="$1"
shift
NODES=1 GPUS=8 PER_GPU=0 PARTITION="" ACCOUNT="" TIME=""
TRAINER_ARGS=() POSITIONAL=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes=*) NODES="${1#*=}" ;;
    --gpus_per_node=*) GPUS="${1#*=}" ;;
    --per_gpu) PER_GPU=1 ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --account=*) ACCOUNT="${1#*=}" ;;
    --time=*) TIME="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAINER_ARGS=("$@"); break ;;
    -*) die "unknown argument '$1' for '$COMMAND' (--help lists them; the trainer's flags go after --)" ;;
    *) POSITIONAL+=("$1") ;;
  esac
  shift
done

case "$COMMAND" in
  submit)
    [[ ${#TRAINER_ARGS[@]} -gt 0 ]] || die "submit needs the trainer's flags after --, e.g. -- --config=configs/x.py --workdir=/shared/run"
    workdir=""
    for a in "${TRAINER_ARGS[@]}"; do [[ $a != --workdir=* ]] || workdir="${a#--workdir=}"; done
    [[ -n $workdir ]] || die "the trainer needs --workdir=... on storage every node mounts (or gs://)."
    [[ $workdir == /* || $workdir == gs://* ]] || die "--workdir=$workdir: give an absolute path on shared storage (or gs://), the same on every node."
    need sbatch
    tasks=1
    [[ $PER_GPU == 0 ]] || tasks="$GPUS"
    opts=("--nodes=$NODES" "--ntasks-per-node=$tasks" "--gpus-per-node=$GPUS")
    [[ -z $PARTITION ]] || opts+=("--partition=$PARTITION")
    [[ -z $ACCOUNT ]] || opts+=("--account=$ACCOUNT")
    [[ -z $TIME ]] || opts+=("--time=$TIME")
    run sbatch "${opts[@]}" "--export=ALL,MRL_JAX_DIR=$REPO" "$REPO/launch/slurm.sbatch" "${TRAINER_ARGS[@]}"
    ;;
  status)
    need squeue
    run squeue --me --name=mrl_jax "${POSITIONAL[@]/#/--jobs=}"
    ;;
  cancel)
    [[ ${#POSITIONAL[@]} == 1 ]] || die "cancel needs one JOBID"
    need scancel
    run scancel --signal=TERM --full "${POSITIONAL[0]}"
    ;;
  *) die "unknown subcommand '$COMMAND': submit, status or cancel" ;;
esac

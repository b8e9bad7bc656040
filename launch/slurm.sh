#!/usr/bin/env bash
# Submit launch/slurm.sbatch with the cluster shape as flags.
#
#   launch/slurm.sh submit --nodes=2 [--gpus_per_node=8] [--per_gpu] [--partition=P] \
#       [--account=A] [--time=24:00:00] [--sbatch=FILE] [--dry_run] \
#       -- --config=configs/imagenet_vit_b16.py --workdir=/shared/runs/b16
#   launch/slurm.sh status [JOBID] [--dry_run]   # squeue for your jobs
#   launch/slurm.sh cancel JOBID [--dry_run]     # SIGTERM only: the trainer saves, then exits
#
# --per_gpu: one process per GPU instead of one per node. --sbatch: your copy of
# launch/slurm.sbatch (site-specific #SBATCH lines). Logs: mrl_jax-JOBID.out in
# the submit directory, each line prefixed by its task number.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0

# shellcheck source=launch/common.sh
source "$REPO/launch/common.sh"
SLURM_HELP="run this on a SLURM login node (SLURM's client commands: sbatch, squeue, scancel)."

[[ $# -gt 0 ]] || { usage; exit 2; }
[[ $1 != -h && $1 != --help ]] || { usage; exit 0; }
COMMAND="$1"
shift
NODES=1 GPUS=8 PER_GPU=0 PARTITION="" ACCOUNT="" TIME="" SBATCH_FILE="$REPO/launch/slurm.sbatch"
TRAINER_ARGS=() POSITIONAL=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes=*) NODES="${1#*=}" ;;
    --gpus_per_node=*) GPUS="${1#*=}" ;;
    --per_gpu) PER_GPU=1 ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --account=*) ACCOUNT="${1#*=}" ;;
    --time=*) TIME="${1#*=}" ;;
    --sbatch=*) SBATCH_FILE="${1#*=}" ;;
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
    need sbatch "$SLURM_HELP"
    tasks=1
    [[ $PER_GPU == 0 ]] || tasks="$GPUS"
    opts=("--nodes=$NODES" "--ntasks-per-node=$tasks" "--gpus-per-node=$GPUS")
    [[ -z $PARTITION ]] || opts+=("--partition=$PARTITION")
    [[ -z $ACCOUNT ]] || opts+=("--account=$ACCOUNT")
    [[ -z $TIME ]] || opts+=("--time=$TIME")
    [[ -f $SBATCH_FILE ]] || die "--sbatch=$SBATCH_FILE: no such file"
    run sbatch "${opts[@]}" "--export=ALL,MRL_JAX_DIR=$REPO" "$SBATCH_FILE" "${TRAINER_ARGS[@]}"
    ;;
  status)
    need squeue "$SLURM_HELP"
    run squeue --me --name=mrl_jax "${POSITIONAL[@]/#/--jobs=}"
    ;;
  cancel)
    [[ ${#POSITIONAL[@]} == 1 ]] || die "cancel needs one JOBID"
    need scancel "$SLURM_HELP"
    run scancel --signal=TERM --full "${POSITIONAL[0]}"
    ;;
  *) die "unknown subcommand '$COMMAND': submit, status or cancel" ;;
esac

#!/usr/bin/env bash
# GKE with xpk: build the image, run the trainer on TPU slices, list, delete.
#
#   launch/xpk.sh build  --image=IMAGE [--extra=tpu|cuda]        # docker build + push
#   launch/xpk.sh run    --cluster=C --workload=W --image=IMAGE --tpu_type=v5litepod-16 \
#       [--num_slices=N] [--zone=Z] [--project=P] [--max_restarts=10] [--spot] \
#       -- --config=configs/imagenet_vit_b16.py --workdir=gs://BUCKET/runs/b16
#       (GPU node pools: --device_type=h100-80gb-8 instead of --tpu_type, --num_nodes=N)
#   launch/xpk.sh list   --cluster=C [--zone=Z] [--project=P]
#   launch/xpk.sh delete --cluster=C --workload=W [--zone=Z] [--project=P]
#
# Every subcommand takes --dry_run (print the commands, run nothing) and --help.
# Prerequisites: xpk (`pip install xpk`), gcloud with kubectl, docker for
# `build`, and a cluster (`xpk cluster create --cluster=C --tpu-type=...
# --num-slices=N`). The image (launch/Dockerfile) holds the code and its pinned
# packages; the run's workdir must be on gs://, which every pod reads and writes.
# JobSet restarts the whole workload up to --max_restarts times when a slice is
# preempted or a pod fails; the trainer then resumes from the workdir's last
# checkpoint.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0

# shellcheck source=launch/common.sh
source "$REPO/launch/common.sh"

[[ $# -gt 0 ]] || { usage; exit 2; }
[[ $1 != -h && $1 != --help ]] || { usage; exit 0; }
COMMAND="$1"
shift
CLUSTER="" WORKLOAD="" IMAGE="" TPU_TYPE="" DEVICE_TYPE="" NUM_SLICES=1 NUM_NODES="" ZONE="" PROJECT=""
MAX_RESTARTS=10 EXTRA=tpu SPOT=0
TRAINER_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cluster=*) CLUSTER="${1#*=}" ;;
    --workload=*) WORKLOAD="${1#*=}" ;;
    --image=*) IMAGE="${1#*=}" ;;
    --tpu_type=*) TPU_TYPE="${1#*=}" ;;
    --device_type=*) DEVICE_TYPE="${1#*=}" ;;
    --num_nodes=*) NUM_NODES="${1#*=}" ;;
    --num_slices=*) NUM_SLICES="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --max_restarts=*) MAX_RESTARTS="${1#*=}" ;;
    --extra=*) EXTRA="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAINER_ARGS=("$@"); break ;;
    *) die "unknown argument '$1' for '$COMMAND' (--help lists them; the trainer's flags go after --)" ;;
  esac
  shift
done

WHERE=()
[[ -z $ZONE ]] || WHERE+=("--zone=$ZONE")
[[ -z $PROJECT ]] || WHERE+=("--project=$PROJECT")
require() { for v in "$@"; do [[ -n ${!v} ]] || die "$COMMAND needs --$(tr '[:upper:]' '[:lower:]' <<<"$v")=..."; done; }

case "$COMMAND" in
  build)
    require IMAGE
    [[ $EXTRA == tpu || $EXTRA == cuda ]] || die "--extra=$EXTRA: use tpu or cuda."
    need docker "install Docker (https://docs.docker.com/engine/install/)"
    run docker build -f "$REPO/launch/Dockerfile" --build-arg "EXTRA=$EXTRA" -t "$IMAGE" "$REPO"
    run docker push "$IMAGE"
    ;;
  run)
    require CLUSTER WORKLOAD IMAGE
    [[ -n $TPU_TYPE || -n $DEVICE_TYPE ]] || die "run needs --tpu_type=... (or --device_type=... for GPUs)"
    [[ -z $TPU_TYPE || -z $DEVICE_TYPE ]] || die "run takes --tpu_type or --device_type, not both"
    [[ ${#TRAINER_ARGS[@]} -gt 0 ]] || die "run needs the trainer's flags after --, e.g. -- --config=configs/x.py --workdir=gs://B/run"
    workdir=""
    for a in "${TRAINER_ARGS[@]}"; do [[ $a != --workdir=* ]] || workdir="${a#--workdir=}"; done
    [[ $workdir == gs://* ]] || die "the trainer's --workdir must be gs://... ('${workdir:-none given}'): every pod of every slice saves and resumes the same checkpoints there."
    need xpk "pip install xpk (https://github.com/AI-Hypercomputer/xpk)"
    trainer="$(printf '%q ' python -m mrl_jax.main "${TRAINER_ARGS[@]}")"
    shape=("--tpu-type=$TPU_TYPE" "--num-slices=$NUM_SLICES")
    [[ -z $DEVICE_TYPE ]] || shape=("--device-type=$DEVICE_TYPE" "--num-nodes=${NUM_NODES:-1}")
    capacity=()
    [[ $SPOT == 0 ]] || capacity=(--spot)
    run xpk workload create "--cluster=$CLUSTER" "--workload=$WORKLOAD" "--docker-image=$IMAGE" \
      "${shape[@]}" "--max-restarts=$MAX_RESTARTS" \
      "${capacity[@]}" "${WHERE[@]}" "--command=${trainer% }"
    ;;
  list)
    require CLUSTER
    need xpk "pip install xpk (https://github.com/AI-Hypercomputer/xpk)"
    run xpk workload list "--cluster=$CLUSTER" "${WHERE[@]}"
    ;;
  delete)
    require CLUSTER WORKLOAD
    need xpk "pip install xpk (https://github.com/AI-Hypercomputer/xpk)"
    run xpk workload delete "--cluster=$CLUSTER" "--workload=$WORKLOAD" "${WHERE[@]}"
    ;;
  -h|--help) usage ;;
  *) die "unknown subcommand '$COMMAND': build, run, list or delete" ;;
esac

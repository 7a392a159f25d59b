#!/usr/bin/env bash
# Launch a jaxrlvr training run on a Cloud TPU slice through a queued resource.
#
#   launch/tpu_queued_resource.sh NAME ZONE ACCELERATOR -- [train flags...]
#   launch/tpu_queued_resource.sh rlvr-7b us-east5-b v5p-64 -- \
#       --config=configs/steer.py:qwen2.5-math-7b \
#       --config.model.path=/mnt/ckpt/Qwen2.5-Math-7B \
#       --config.data.train_files=/mnt/data/dapo-math-17k.parquet \
#       --config.workdir=/mnt/runs/steer-7b
#
# The checkpoint, data and workdir must be on storage every host sees (a Filestore or
# GCS-fuse mount given by MOUNT_CMD). Every host runs the same command; `jaxrlvr.train`
# calls `jax.distributed.initialize()` when JAXRLVR_DISTRIBUTED=1. Rerunning the same
# command after a preemption resumes from the last checkpoint.
# Status: single-host slices (e.g. v5p-8, v4-8) run the same code path as a GPU box.
# Multi-host model loading/export is tested (docs/model.md); multi-host *training* is not
# yet validated: rollouts would need a per-host sampler mesh (see docs/training.md).
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,15p' "$0"
  exit 2
fi
NAME=$1 ZONE=$2 ACCELERATOR=$3
shift 3
[[ "${1:-}" == "--" ]] && shift
TRAIN_ARGS=("$@")
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
REPO_URL=${REPO_URL:?set REPO_URL to a git URL of this repository the TPU VMs can clone}
REF=${REF:-main}
MOUNT_CMD=${MOUNT_CMD:-true}
SPOT=${SPOT:+--spot}

gcloud compute tpus queued-resources create "$NAME" \
  --node-id "$NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" \
  --runtime-version "$RUNTIME" ${SPOT:-}

echo "waiting for $NAME to become ACTIVE..."
until [[ "$(gcloud compute tpus queued-resources describe "$NAME" --zone "$ZONE" \
            --format='value(state.state)')" == "ACTIVE" ]]; do
  sleep 30
done

quoted=$(printf ' %q' "${TRAIN_ARGS[@]}")
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "
  set -euo pipefail
  $MOUNT_CMD
  if [ ! -d jaxrlvr ]; then git clone $REPO_URL jaxrlvr; fi
  cd jaxrlvr && git fetch -q origin && git checkout -q $REF
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -e . 'jax[tpu]==0.10.2'
  JAXRLVR_DISTRIBUTED=1 python -m jaxrlvr.train$quoted
"

#!/usr/bin/env bash
# Example: train on a multi-host Cloud TPU VM slice (e.g. v5p-64). Every worker runs the same
# command; jax.distributed finds the other workers from the TPU metadata (moss_jax/distributed.py),
# each worker feeds its own rows, and checkpoints go to a bucket all workers can reach.
#
#   TPU=my-v5p-64 ZONE=us-east5-a BUCKET=gs://my-bucket launch/tpu_vm.sh configs/pretrain.py:4b_stage1
#
# Preemption: the TPU VM sends SIGTERM; the run writes a checkpoint and exits 0. Run the same
# command again (or let your scheduler do it) to resume.
set -euo pipefail
config=${1:?usage: launch/tpu_vm.sh CONFIG[:PRESET] [extra --config.* flags]}; shift
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET (gs://...)}"
run_name=${RUN_NAME:-$(basename "${config%%:*}" .py)_${config##*:}}

gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  cd ~/moss_jax
  python3 -m moss_jax.train --config ${config} --workdir ${BUCKET}/runs/${run_name} $*
"

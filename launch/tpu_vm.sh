#!/usr/bin/env bash
# Train on a multi-host Cloud TPU VM slice (e.g. v5p-64). Every worker runs the same command;
# jax.distributed finds the other workers through the TPU metadata (moss_jax/distributed.py), each
# worker feeds its own rows, and the run directory is a bucket all workers reach.
#
#   TPU=my-v5p-64 ZONE=us-east5-a BUCKET=gs://my-bucket launch/tpu_vm.sh [--dry_run] \
#       configs/pretrain.py:4b_stage1 [--config.x=y ...]
#
# --dry_run prints the gcloud command (and the command each worker runs) instead of running it.
# Arguments reach the workers exactly as given: each is quoted for the remote shell.
# Preemption: the TPU VM sends SIGTERM; the run writes a checkpoint and exits 0. Run the same
# command again (or let your scheduler do it) to resume.
set -euo pipefail
dry_run=0
if [[ "${1:-}" == "--dry_run" ]]; then dry_run=1; shift; fi
config=${1:?usage: launch/tpu_vm.sh [--dry_run] CONFIG[:PRESET] [extra --config.* flags]}; shift
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET (gs://...)}"
run_name=${RUN_NAME:-$(basename "${config%%:*}" .py)_${config##*:}}
repo_dir=${REPO_DIR:-moss_jax}  # the checkout on the workers, relative to the home directory

train=(python3 -m moss_jax.train --config "$config" --workdir "${BUCKET%/}/runs/${run_name}" "$@")
remote="set -e; cd ~/$(printf '%q' "$repo_dir"); $(printf '%q ' "${train[@]}")"
remote=${remote% }
cmd=(gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$remote")

if [[ $dry_run -eq 1 ]]; then
  echo "# on every worker: $remote"
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"

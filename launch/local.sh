#!/usr/bin/env bash
# Runs N copies of a command on this machine as one multi-process JAX job (CPU devices).
#
#   launch/local.sh [--dry_run] NUM_PROCESSES DEVICES_PER_PROCESS COMMAND...
#   launch/local.sh 2 4 python -m moss_jax.train --config configs/pretrain.py:demo --workdir /tmp/mp
#
# Every process gets MOSS_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID (read by
# moss_jax/distributed.py) and its own forced host device count. Process 0 prints to the
# terminal; process i writes to ${LOG_DIR:-/tmp}/moss_jax_process_i.log. The script exits with
# the first non-zero status, and stops the other processes when one fails. --dry_run prints
# each process's command instead of starting it.
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry_run" ]]; then dry_run=1; shift; fi
if [[ $# -lt 3 ]]; then
  sed -n '2,12p' "$0"; exit 64
fi
num_processes=$1; devices=$2; shift 2
port=${MOSS_JAX_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-/tmp}

if [[ $dry_run -eq 1 ]]; then
  for ((i = 0; i < num_processes; i++)); do
    out=""; [[ $i -gt 0 ]] && out=" > $(printf '%q' "${log_dir}/moss_jax_process_${i}.log") 2>&1"
    echo "env MOSS_JAX_COORDINATOR=127.0.0.1:${port} MOSS_JAX_NUM_PROCESSES=${num_processes}" \
      "MOSS_JAX_PROCESS_ID=${i} JAX_PLATFORMS=cpu" \
      "XLA_FLAGS=--xla_force_host_platform_device_count=${devices} $(printf '%q ' "$@")${out} &"
  done
  exit 0
fi

mkdir -p "$log_dir"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup INT TERM

for ((i = 0; i < num_processes; i++)); do
  if [[ $i -eq 0 ]]; then
    env MOSS_JAX_COORDINATOR="127.0.0.1:${port}" MOSS_JAX_NUM_PROCESSES="$num_processes" \
      MOSS_JAX_PROCESS_ID="$i" JAX_PLATFORMS=cpu \
      XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" \
      "$@" &
  else
    env MOSS_JAX_COORDINATOR="127.0.0.1:${port}" MOSS_JAX_NUM_PROCESSES="$num_processes" \
        MOSS_JAX_PROCESS_ID="$i" JAX_PLATFORMS=cpu \
        XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" \
        "$@" > "${log_dir}/moss_jax_process_${i}.log" 2>&1 &
  fi
  pids+=($!)
done

# Wait for whichever process ends first; a failure stops the others (they would hang in a
# collective otherwise).
status=0
for ((n = 0; n < num_processes; n++)); do
  rc=0
  wait -n || rc=$?
  if [[ $rc -ne 0 && $status -eq 0 ]]; then status=$rc; cleanup; fi
done
exit "$status"

#!/usr/bin/env bash
# Start N maxllama processes on this machine as one multi-process JAX job (CPU devices, gloo collectives).
#   launch/local/run.sh N [DEVICES_PER_PROCESS] -- maxllama train CONFIG key=value ...
# Exits with the first non-zero exit code of any process (75 = preempted, re-run to resume).
set -uo pipefail
n="${1:?usage: run.sh N [DEVICES_PER_PROCESS] -- COMMAND...}"; shift
devices=1
if [[ "${1:-}" != "--" ]]; then devices="$1"; shift; fi
[[ "${1:-}" == "--" ]] && shift
port="${MAXLLAMA_PORT:-$(( 20000 + RANDOM % 20000 ))}"
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
for ((i = 0; i < n; i++)); do
  MAXLLAMA_COORDINATOR="localhost:${port}" MAXLLAMA_NUM_PROCESSES="$n" MAXLLAMA_PROCESS_ID="$i" \
    MAXLLAMA_CPU_DEVICES="$devices" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid"; code=$?
  while (( code > 128 )) && kill -0 "$pid" 2>/dev/null; do wait "$pid"; code=$?; done  # interrupted by our trap
  (( status == 0 )) && status=$code
done
exit "$status"

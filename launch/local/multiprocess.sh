#!/bin/bash
# Runs N copies of a command on this machine as one multi-process JAX job (CPU or one GPU each):
#   launch/local/multiprocess.sh --ntasks=N [other --options, ignored] COMMAND [ARGS...]
# It takes srun's place in a rendered SLURM script. Each copy gets FLEXOLMO_COORDINATOR,
# FLEXOLMO_NUM_PROCESSES and FLEXOLMO_PROCESS_ID; if one fails the others are stopped
# (like srun --kill-on-bad-exit) and its exit status is returned.
set -uo pipefail
ntasks=1
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --ntasks=*) ntasks=${1#--ntasks=} ;;
    --ntasks) ntasks=$2; shift ;;
  esac
  shift
done
if [[ $# -eq 0 ]]; then
  echo "usage: $0 --ntasks=N COMMAND [ARGS...]" >&2
  exit 2
fi
port=${FLEXOLMO_LOCAL_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < ntasks; i++)); do
  # Each copy in its own process group, so stopping it stops its children too.
  FLEXOLMO_COORDINATOR=localhost:$port FLEXOLMO_NUM_PROCESSES=$ntasks FLEXOLMO_PROCESS_ID=$i \
    setsid "$@" &
  pids+=($!)
done
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
}
trap 'stop_all; exit 143' INT TERM
status=0
for _ in "${pids[@]}"; do
  wait -n "${pids[@]}"
  code=$?
  if [[ $code -ne 0 && $status -eq 0 ]]; then
    status=$code
    stop_all
  fi
done
exit $status

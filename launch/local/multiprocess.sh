#!/bin/bash
# Runs N copies of a command on this machine as one multi-process JAX job (CPU or one GPU each):
#   launch/local/multiprocess.sh --ntasks=N [other --options, ignored] COMMAND [ARGS...]
# It takes srun's place in a rendered SLURM script. Each copy gets FLEXOLMO_COORDINATOR,
# FLEXOLMO_NUM_PROCESSES and FLEXOLMO_PROCESS_ID; if one fails the others are stopped
# (SIGTERM, then SIGKILL after FLEXOLMO_KILL_GRACE seconds, default 30, like srun
# --kill-on-bad-exit) and its exit status is returned. Stopping the launcher (SIGINT/SIGTERM)
# stops every copy the same way and exits 143.
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
grace=${FLEXOLMO_KILL_GRACE:-30}
pids=()
for ((i = 0; i < ntasks; i++)); do
  # Each copy in its own session and process group, so stopping it stops its children too.
  FLEXOLMO_COORDINATOR=localhost:$port FLEXOLMO_NUM_PROCESSES=$ntasks FLEXOLMO_PROCESS_ID=$i \
    setsid "$@" &
  pids+=($!)
done
live=("${pids[@]}")
killer=""
# A copy may not have reached setsid yet when another fails (on a busy machine it often has not),
# so each copy is signalled itself as well as its group. Copies still there after $grace seconds
# (a training process saves its checkpoint on SIGTERM) are killed.
signal_live() {
  for pid in "${live[@]}"; do
    kill "-$1" -- "-$pid" 2>/dev/null
    kill "-$1" "$pid" 2>/dev/null
  done
}
stop_all() {
  [[ -n $killer ]] && return
  signal_live TERM
  (
    trap 'kill "$nap" 2>/dev/null; exit 0' TERM
    sleep "$grace" &
    nap=$!
    wait "$nap"
    signal_live KILL
  ) </dev/null >/dev/null 2>&1 &
  killer=$!
}
status=0
# Stopped from outside: stop every copy, wait for them (at most $grace seconds), exit 143.
trap 'status=143; stop_all' INT TERM
# Polled rather than `wait -n`: bash may reap two copies at once and then no longer lists the
# second as a job, so `wait -n` would miss its exit status.
while [[ ${#live[@]} -gt 0 ]]; do
  rest=()
  for pid in "${live[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      rest+=("$pid")
      continue
    fi
    wait "$pid"
    code=$?
    [[ $code -ne 0 && $status -eq 0 ]] && status=$code
  done
  live=("${rest[@]}")
  [[ $status -ne 0 ]] && stop_all
  [[ ${#live[@]} -gt 0 ]] && sleep 0.2
done
[[ -n $killer ]] && kill "$killer" 2>/dev/null
exit $status

#!/usr/bin/env bash
# Several JAX processes on this machine, wired by jax.distributed through a local
# coordinator: the multi-host code path (per-process data, cross-process collectives,
# Orbax on several hosts, process-0 outputs) without a cluster. Used by tests/test_multihost.py.
#
#   launch/local_multiprocess.sh [-n PROCESSES] [-d CPU_DEVICES_PER_PROCESS] [-p PORT] \
#       [-m MODULE] -- ARGS...
#   launch/local_multiprocess.sh -n 2 -d 4 -- --config=configs/tiny.py --workdir=/tmp/dpg_mp \
#       --config.mesh.param_sharding=fsdp
#
# Defaults: 2 processes x 4 forced CPU devices, a free port, MODULE dpg_jax.main. Each
# process's output is prefixed with [its id]; the first process to fail stops the others,
# and its exit status is the script's. PYTHON (default python3) chooses the interpreter.
set -euo pipefail
NPROC=2
NDEV=4
PORT=0
MODULE=dpg_jax.main
PYTHON=${PYTHON:-python3}
while getopts "n:d:p:m:" opt; do
  case $opt in
    n) NPROC=$OPTARG ;;
    d) NDEV=$OPTARG ;;
    p) PORT=$OPTARG ;;
    m) MODULE=$OPTARG ;;
    *) echo "usage: $0 [-n PROCESSES] [-d DEVICES] [-p PORT] [-m MODULE] -- ARGS..." >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ "${1:-}" == "--" ]]; then shift; fi
if [[ "$PORT" == 0 ]]; then
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$NDEV"
pids=()
for ((i = 0; i < NPROC; i++)); do
  DPG_JAX_COORDINATOR=127.0.0.1:$PORT DPG_JAX_NUM_PROCESSES=$NPROC DPG_JAX_PROCESS_ID=$i \
    JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} XLA_FLAGS="$FLAGS" \
    "$PYTHON" -m "$MODULE" "$@" > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  pids+=($!)
done
status=0
for ((left = NPROC; left > 0; left--)); do
  wait -n "${pids[@]}" || status=$?
  if [[ $status != 0 ]]; then
    echo "local_multiprocess: a process failed (exit $status); stopping the others" >&2
    kill "${pids[@]}" 2>/dev/null || true
    wait || true
    break
  fi
done
exit $status

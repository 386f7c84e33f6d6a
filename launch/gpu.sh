#!/usr/bin/env bash
# One GPU host (all its GPUs form the 'data' axis):
#   launch/gpu.sh configs/dreambooth_dpg.py runs/dog --config.data.instance_dir=photos/dog
set -euo pipefail
CONFIG=${1:?config file}; WORKDIR=${2:?workdir}; shift 2
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
# The compile cache is on by default (config compilation_cache_dir: ~/.cache/dpg_jax/xla);
# JAX_CACHE points it elsewhere.
exec python3 -m dpg_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  ${JAX_CACHE:+--config.compilation_cache_dir="$JAX_CACHE"} "$@"

#!/usr/bin/env bash
# GPU check, run once per issue that is lent a GPU (the `device` tool), from the repo root:
#   the GPU image lacks our pinned diffusers/transformers: carry them as wheels in .whl/
#   (see launch/fetch_gpu_wheels.sh), install them into /tmp/site, then run the
#   GPU-relevant tests and the SD1.4-shape benchmark in bf16 and fp32 and print a table.
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import jax, flax, diffusers, transformers; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
# GPU-relevant tests (models parity, sampler, train step, DPG) on the GPU itself:
# conftest only defaults JAX_PLATFORMS to cpu, and its CPU compile flags are dropped.
JAX_PLATFORMS=cuda XLA_FLAGS= timeout 300 python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_models.py tests/test_sampling.py tests/test_train.py tests/test_dpg.py 2>&1 | tail -15
for dt in bfloat16 float32; do
  timeout 300 python3 -m dpg_jax.bench --config=configs/dreambooth_dpg.py:robust --shapes=sd14 --steps=10 \
    --variants=dreambooth,dpg,dpg_dino --config.model.dtype=$dt --json_out="$OUT/bench_sd14_$dt.json" 2>&1 \
    | grep -E '^\||^device' || echo "bench $dt failed"
done

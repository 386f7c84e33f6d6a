#!/usr/bin/env bash
# GPU check, run once per issue that is lent a GPU (the `device` tool), from the repo root,
# in one call of under 10 minutes:
#   the GPU image lacks our pinned diffusers/transformers: carry them as wheels in .whl/
#   (launch/fetch_gpu_wheels.sh), installed here into /tmp/site. Then: the step tests on the
#   GPU, and SD1.4-shape 512 px DreamBooth and DPG steps in fp32, bf16 and bf16 with cuDNN
#   flash attention (model.attention=dot_product): s/step, steps/s, MFU, peak device memory
#   and a 1000-step estimate, printed as one table ready to paste into a note.
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
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/xla_cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import jax, flax, diffusers, transformers; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
# The step's own tests on the GPU (conftest only defaults JAX_PLATFORMS to cpu; its CPU
# compile flags are dropped).
JAX_PLATFORMS=cuda XLA_FLAGS= timeout 120 python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_step.py tests/test_diffusion.py 2>&1 | tail -3
rows=()
for setting in "float32 standard" "bfloat16 standard" "bfloat16 dot_product"; do
  set -- $setting
  json="$OUT/bench_sd14_$1_$2.json"
  timeout 150 python3 -m dpg_jax.bench --config=configs/dreambooth_dpg.py:robust --shapes=sd14 \
    --steps=10 --noisolate --variants=dreambooth,dpg --config.model.dtype=$1 \
    --config.model.attention=$2 --json_out="$json" 2>&1 | grep -E '^\||^device' \
    || echo "bench $1 $2 failed or timed out"
  rows+=("$json")
done
python3 - "${rows[@]}" <<'PY'
import json, os, sys
print('\n| dtype / attention | variant | compile s | s/step | steps/s | MFU | peak GiB | 1000 steps (min) |')
print('|---|---|---|---|---|---|---|---|')
for path in sys.argv[1:]:
  if not os.path.exists(path):
    print(f'| {os.path.basename(path)} | failed | | | | | | |'); continue
  d = json.load(open(path))
  tag = os.path.basename(path)[len('bench_sd14_'):-len('.json')].replace('_', ' / ', 1)
  for r in d['rows']:
    print(f"| {tag} | {r['variant']} | {r['compile_s']:.0f} | {r['s_per_step']:.3f} | "
          f"{1 / r['s_per_step']:.2f} | {r.get('mfu', float('nan')):.1%} | "
          f"{r['peak_mem_gib']:.1f} | {1000 * r['s_per_step'] / 60:.1f} |")
PY

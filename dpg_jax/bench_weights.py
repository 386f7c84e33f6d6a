"""Peak host memory of converting SD1.4-shape PyTorch UNet weights to Flax.

Writes random SD1.4-shape UNet weights (dpg_jax.bench.SD14_UNET) in PyTorch
diffusers safetensors layout, then converts them with
`weights.convert_pt_to_flax(weights.read_state_dict(path), shapes)` in a fresh
subprocess and reports its ru_maxrss. Needs ~2x the file (3.4 GB fp32) of free
RAM with the memory-mapped reader, ~3x with a reader that reads whole files:

  python -m dpg_jax.bench_weights [--path=/tmp/sd14_unet.safetensors]
      [--weights_py=FILE]   # measure another weights.py (e.g. an older commit's)

Prints one JSON line: file size, RSS before the conversion (imports + shapes)
and the peak, in GiB, and the seconds the conversion took.
"""
import json
import os
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags

_PATH = flags.DEFINE_string('path', '/tmp/dpg_jax_sd14_unet.safetensors',
                            'Weights file to write (kept if it exists) and convert.')
_WEIGHTS_PY = flags.DEFINE_string('weights_py', '',
                                  'weights.py to measure instead of dpg_jax.weights.')
_CHILD = flags.DEFINE_bool('child', False, 'Internal: run the conversion in this process.')

_GIB = 2 ** 30


def _unet_shapes():
  import jax  # pylint: disable=g-import-not-at-top
  from dpg_jax import bench  # pylint: disable=g-import-not-at-top
  from dpg_jax import models  # pylint: disable=g-import-not-at-top
  from dpg_jax import weights  # pylint: disable=g-import-not-at-top
  unet = models.make_unet(bench.SD14_UNET)
  return weights.flax_shapes(unet.init_weights, jax.random.PRNGKey(0))


def write_weights(path):
  """Random fp32 SD1.4 UNet weights as diffusers' PyTorch safetensors file."""
  import flax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dpg_jax import weights  # pylint: disable=g-import-not-at-top

  flat = flax.traverse_util.flatten_dict(_unet_shapes())
  # PyTorch names and shapes via the exporter's converter, one leaf at a time
  # (zero-size placeholders), so writing never holds the whole model.
  entries = []
  for key, s in sorted(flat.items()):
    leaf = flax.traverse_util.unflatten_dict({key: np.empty(s.shape, np.float32)})
    (name, x), = weights.convert_flax_to_pt(leaf).items()
    entries.append((name, x.shape))
  header, offset = {'__metadata__': {'format': 'pt'}}, 0
  for name, shape in entries:
    n = 4 * int(np.prod(shape))
    header[name] = {'dtype': 'F32', 'shape': list(shape), 'data_offsets': [offset, offset + n]}
    offset += n
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)  # safetensors aligns the data to 8 bytes.
  rng = np.random.default_rng(0)
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(len(blob).to_bytes(8, 'little') + blob)
    for _, shape in entries:
      f.write(rng.standard_normal(shape, np.float32).tobytes())
  os.replace(tmp, path)


def _child(path, weights_py):
  import importlib.util  # pylint: disable=g-import-not-at-top
  from dpg_jax import weights  # pylint: disable=g-import-not-at-top
  if weights_py:
    spec = importlib.util.spec_from_file_location('weights_under_test', weights_py)
    weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(weights)
  shapes = _unet_shapes()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  t = time.perf_counter()
  tree = weights.convert_pt_to_flax(weights.read_state_dict(path), shapes, source=path)
  seconds = time.perf_counter() - t
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  del tree
  print(json.dumps({'weights_py': weights_py or weights.__file__,
                    'file_gib': round(os.path.getsize(path) / _GIB, 3),
                    'rss_before_gib': round(before / _GIB, 3),
                    'peak_rss_gib': round(peak / _GIB, 3), 'seconds': round(seconds, 1)}))


def main(argv):
  del argv
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  path = os.path.abspath(_PATH.value)
  if _CHILD.value:
    _child(path, _WEIGHTS_PY.value)
    return
  if not os.path.isfile(path):
    write_weights(path)
  # A fresh process: ru_maxrss is the peak since start, so writing the file
  # here must not count.
  cmd = [sys.executable, '-m', 'dpg_jax.bench_weights', '--child', f'--path={path}',
         f'--weights_py={_WEIGHTS_PY.value}']
  subprocess.run(cmd, check=True)


if __name__ == '__main__':
  app.run(main)

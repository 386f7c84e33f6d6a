"""Torch-free weight IO: read PyTorch-format checkpoints, map them onto Flax.

* `read_state_dict(path)`: {name: np.ndarray} from .safetensors (memory-mapped
  by the safetensors library, read per tensor), PyTorch zip pickles
  (.bin/.pt/.pth, read with a restricted unpickler, no torch) or sharded
  checkpoints (*.index.json). bf16 comes back as ml_dtypes.bfloat16. A
  truncated or corrupt file raises one ValueError line naming it.
* `flax_shapes(init_fn, *args)`: the parameter shapes of a module, no compute.
* `convert_pt_to_flax(pt_state, shapes, ...)`: rename/transpose PyTorch tensors
  into a nested dict of float32 arrays with exactly the structure of `shapes`.
* `convert_flax_to_pt(params, ...)`: the inverse, for PyTorch exports.
"""
import collections
import json
import os
import pickle
import re
from typing import Any, Mapping, Sequence
import zipfile
import zlib

import flax
from flax import traverse_util
import jax
import ml_dtypes
import numpy as np
import safetensors

# PyTorch buffers that have no Flax counterpart; never reported as unexpected.
DEFAULT_IGNORE = (r'(^|\.)position_ids$', r'(^|\.)num_batches_tracked$')

# Keys under which training scripts commonly nest the weights.
_WRAPPER_KEYS = ('state_dict', 'model', 'module', 'model_state_dict', 'ema')

_TORCH_STORAGES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32,
    'HalfStorage': np.float16, 'BFloat16Storage': ml_dtypes.bfloat16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
    'UntypedStorage': np.uint8,
}

_TORCH_DTYPES = {
    'float64': np.float64, 'double': np.float64, 'float32': np.float32,
    'float': np.float32, 'float16': np.float16, 'half': np.float16,
    'bfloat16': ml_dtypes.bfloat16, 'int64': np.int64, 'long': np.int64,
    'int32': np.int32, 'int': np.int32, 'int16': np.int16, 'int8': np.int8,
    'uint8': np.uint8, 'bool': np.bool_,
}


# ---------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------
class SafetensorsStateDict(Mapping):
  """{name: np.ndarray} of .safetensors files, read lazily, one tensor at a time.

  A lookup maps the file (safetensors.safe_open), copies that one tensor out
  and unmaps it again: converting a checkpoint then holds its converted copy
  plus one source tensor, not the file's pages as well (mapped pages count in
  the process's RSS for as long as the map lives). Re-opening re-parses the
  header, ~2 ms per tensor at SD size. The safetensors library handles bf16
  and fp8 too.
  """

  def __init__(self, paths: Sequence[str]):
    self._where = {}
    for path in paths:
      with self._open(path) as handle:
        self._where.update((name, path) for name in handle.keys())

  @staticmethod
  def _open(path):
    try:
      return safetensors.safe_open(path, framework='numpy')
    except (safetensors.SafetensorError, OSError) as e:
      raise _corrupt(path, 'safetensors', e) from e

  def __getitem__(self, name):
    path = self._where[name]
    with self._open(path) as handle:
      try:
        return handle.get_tensor(name)
      except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise _corrupt(path, 'safetensors', e) from e

  def __iter__(self):
    return iter(self._where)

  def __len__(self):
    return len(self._where)


def _corrupt(path, kind, exc) -> ValueError:
  """One-line error naming a weights file that cannot be parsed."""
  detail = ' '.join(str(exc).split()) or type(exc).__name__
  return ValueError(f'{path}: truncated or corrupt {kind} file ({detail}); '
                    're-download or re-export it.')


class _Storage:
  """A typed storage class as named in the pickle (e.g. torch.HalfStorage)."""

  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage, offset, size, stride, *unused_args):
  size, stride = tuple(size), tuple(stride)
  if not size:
    return np.array(storage[offset])  # 0-d array, not a numpy scalar.
  item = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False)
  return np.ascontiguousarray(view)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *unused):
  # v3 tensors sit on an untyped (byte) storage and carry their own dtype.
  return _rebuild_tensor(storage.view(dtype), offset, size, stride)


def _opaque(module, name):
  """Stand-in for any other global: never runs the checkpoint's code."""

  class Opaque:

    def __init__(self, *args, **kwargs):
      del args, kwargs

    def __setstate__(self, state):
      del state

    def __call__(self, *args, **kwargs):
      return Opaque()

  Opaque.__qualname__ = Opaque.__name__ = f'Opaque[{module}.{name}]'
  return Opaque


class _TorchUnpickler(pickle.Unpickler):
  """Maps the few globals a state dict needs to numpy; nothing is imported."""

  def __init__(self, file, read_storage):
    super().__init__(file)
    self._read_storage = read_storage

  def find_class(self, module, name):
    if module == 'torch._utils' and name in ('_rebuild_tensor', '_rebuild_tensor_v2'):
      return _rebuild_tensor
    if module == 'torch._utils' and name == '_rebuild_tensor_v3':
      return _rebuild_tensor_v3
    if module == 'torch._utils' and name in ('_rebuild_parameter',
                                             '_rebuild_parameter_with_state'):
      return lambda data, *unused: data
    if module == 'torch._tensor' and name == '_rebuild_from_type_v2':
      return lambda func, new_type, args, state: func(*args)
    if module in ('torch', 'torch.storage') and name in _TORCH_STORAGES:
      return _Storage(_TORCH_STORAGES[name])
    if module == 'torch' and name in _TORCH_DTYPES:
      return np.dtype(_TORCH_DTYPES[name])
    if module == 'collections' and name == 'OrderedDict':
      return collections.OrderedDict
    if module == 'torch' and name == 'Size':
      return tuple
    return _opaque(module, name)

  def persistent_load(self, pid):
    # ('storage', storage_type, key, location, numel)
    if not (isinstance(pid, tuple) and pid and pid[0] == 'storage'):
      raise pickle.UnpicklingError(f'Unsupported persistent id {pid!r}.')
    storage_type, key = pid[1], str(pid[2])
    dtype = storage_type.dtype if isinstance(storage_type, _Storage) else np.dtype(np.uint8)
    return self._read_storage(key, dtype)


def read_torch_pickle(path) -> Any:
  """Loads a PyTorch zip checkpoint (torch>=1.6 `torch.save`) without torch.

  Tensors become numpy arrays; other objects the state dict does not need
  become inert placeholders.
  """
  if not zipfile.is_zipfile(path):
    raise ValueError(
        f'{path} is not a zip-format PyTorch checkpoint: truncated or corrupt, or the '
        'legacy torch<1.6 format; re-download it, or re-save it with a recent torch.save '
        'or as .safetensors.')
  try:
    return _read_torch_zip(path)
  except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, KeyError, ValueError,
          zlib.error) as e:
    raise _corrupt(path, 'PyTorch checkpoint', e) from e


def _read_torch_zip(path):
  with zipfile.ZipFile(path) as zf:
    pkl = [n for n in zf.namelist() if n.endswith('data.pkl')]
    if not pkl:
      raise ValueError('no data.pkl inside; not a PyTorch checkpoint')
    root = pkl[0][:-len('data.pkl')]
    byteorder = 'little'
    if root + 'byteorder' in zf.namelist():
      byteorder = zf.read(root + 'byteorder').decode().strip()
    cache = {}

    def read_storage(key, dtype):
      if key not in cache:
        dt = dtype.newbyteorder('<' if byteorder == 'little' else '>')
        cache[key] = np.frombuffer(zf.read(f'{root}data/{key}'), dtype=dt).astype(
            dtype.newbyteorder('='))
      arr = cache[key]
      return arr if arr.dtype == dtype else arr.view(dtype)

    with zf.open(pkl[0]) as f:
      return _TorchUnpickler(f, read_storage).load()


def _tensors_only(obj, prefix=''):
  """Flattens nested dicts to {'a.b': array}; drops non-array entries."""
  out = {}
  for k, v in obj.items():
    name = f'{prefix}{k}'
    if isinstance(v, np.ndarray):
      out[name] = v
    elif isinstance(v, Mapping):
      out.update(_tensors_only(v, name + '.'))
  return out


def read_state_dict(path, key: str | None = None) -> Mapping[str, np.ndarray]:
  """{name: np.ndarray} from a .safetensors, PyTorch zip or *.index.json file.

  Safetensors come back as a lazy `SafetensorsStateDict` (memory-mapped).

  Args:
    path: a .safetensors file, a PyTorch .bin/.pt/.pth file, or the
      `*.index.json` of a sharded checkpoint (shards are read from its folder).
    key: for checkpoints that nest the weights (`{'model': {...}, 'epoch':
      3}`), the dotted path of the sub-dict to return (e.g. 'teacher'). If
      None and the top level holds no tensors, a single one of the usual
      wrapper keys (state_dict, model, module, model_state_dict, ema) is
      unwrapped. Nested dicts are flattened with '.'; non-tensors dropped.
  """
  path = os.fspath(path)
  if path.endswith('.index.json'):
    try:
      with open(path) as f:
        weight_map = json.load(f)['weight_map']
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
      raise _corrupt(path, 'checkpoint index', e) from e
    shards = [os.path.join(os.path.dirname(path), s) for s in sorted(set(weight_map.values()))]
    if key is None and all(s.endswith('.safetensors') for s in shards):
      return SafetensorsStateDict(shards)
    out = {}
    for shard in shards:
      out.update(read_state_dict(shard, key=key))
    return out
  if path.endswith('.safetensors'):
    obj = SafetensorsStateDict([path])
    if key is None:
      return obj  # Flat and tensors only; stays lazy.
  else:
    obj = read_torch_pickle(path)
  if not isinstance(obj, Mapping):
    raise ValueError(f'{path} holds a {type(obj).__name__}, not a state dict.')
  if key is not None:
    for part in key.split('.'):
      if not isinstance(obj, Mapping) or part not in obj:
        raise KeyError(f'{path}: no entry {part!r} (of key={key!r}); '
                       f'top-level keys: {sorted(map(str, obj))[:20]}.')
      obj = obj[part]
  elif not any(isinstance(v, np.ndarray) for v in obj.values()):
    wrappers = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
    if len(wrappers) == 1:
      obj = obj[wrappers[0]]
  return _tensors_only(obj)


# ---------------------------------------------------------------------------
# Conversion.
# ---------------------------------------------------------------------------
def flax_shapes(init_fn, *args, **kwargs):
  """Parameter ShapeDtypeStructs of `init_fn(*args)` via jax.eval_shape.

  No parameter is materialised. A `{'params': ...}` result (Module.init) is
  unwrapped to the params tree.
  """
  shapes = flax.core.unfreeze(jax.eval_shape(init_fn, *args, **kwargs))
  if isinstance(shapes, Mapping) and set(shapes) == {'params'}:
    shapes = shapes['params']
  return shapes


def _diffusers_rename(key):
  # 'down_blocks.0.resnets.1.conv1' -> 'down_blocks_0.resnets_1.conv1': Flax
  # list attributes are named '<attr>_<i>'.
  return re.sub(r'(\w+)\.(\d+)(?=\.|$)', r'\1_\2', key)


# diffusers' Attention (to_q, ...) vs the Flax attention modules (query, ...).
_ATTN_RENAMES = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out_0': 'proj_attn'}
_LEAF_CANDIDATES = {
    'weight': ('kernel', 'scale', 'embedding', 'weight'),
    'gamma': ('scale', 'weight'),
    'beta': ('bias',),
    'bias': ('bias',),
}


def _to_flax_layout(x, leaf, want):
  """Transposes a PyTorch tensor into the Flax layout of `want` (a shape)."""
  if leaf != 'kernel':
    return x
  if x.ndim == 4 and len(want) == 4:   # Conv2d OIHW -> HWIO.
    return x.transpose(2, 3, 1, 0)
  if x.ndim == 3 and len(want) == 3:   # Conv1d OIW -> WIO.
    return x.transpose(2, 1, 0)
  if x.ndim == 2 and len(want) == 2:   # Linear (out, in) -> (in, out).
    return x.T
  if x.ndim == 4 and len(want) == 2 and x.shape[2:] == (1, 1):  # 1x1 conv -> Dense.
    return x[:, :, 0, 0].T
  if x.ndim == 2 and len(want) == 4 and want[:2] == (1, 1):     # Dense -> 1x1 conv.
    return x.T[None, None]
  return x


def convert_pt_to_flax(pt_state: Mapping[str, np.ndarray], shapes, library: str = 'diffusers',
                       prefix: str = '', ignore: Sequence[str] = DEFAULT_IGNORE,
                       source: str = ''):
  """Maps a PyTorch state dict onto a Flax params tree of shapes `shapes`.

  Args:
    pt_state: {dotted PyTorch name: array} (see `read_state_dict`).
    shapes: the Flax params pytree (ShapeDtypeStructs or arrays), e.g. from
      `flax_shapes`. The result has exactly this structure.
    library: 'diffusers' (list submodules named 'blocks_0', attention to_q ->
      query, ...) or 'transformers' (list submodules named 'layers/0').
    prefix: only PyTorch keys starting with it are used, with it stripped
      (e.g. 'text_model.' to take one tower of a bigger checkpoint).
    ignore: regexes of PyTorch keys (after `prefix`) to skip (buffers).
    source: where `pt_state` came from, for error messages.

  Returns:
    Nested dict of float32 numpy arrays.

  Raises:
    ValueError listing missing, unexpected and mis-shaped keys.
  """
  if library not in ('diffusers', 'transformers'):
    raise ValueError(f"library must be 'diffusers' or 'transformers', got {library!r}.")
  want = {k: tuple(v.shape) for k, v in
          traverse_util.flatten_dict(flax.core.unfreeze(shapes)).items()}
  out, unexpected, misshaped, seen = {}, [], [], set()
  for pt_key, x in pt_state.items():
    if not pt_key.startswith(prefix):
      continue
    key = pt_key[len(prefix):]
    if any(re.search(p, key) for p in ignore):
      continue
    if library == 'diffusers':
      key = _diffusers_rename(key)
    *mod, leaf = key.split('.')
    mods = [tuple(mod)]
    if mod and mod[-1] in _ATTN_RENAMES:
      mods.insert(0, tuple(mod[:-1]) + (_ATTN_RENAMES[mod[-1]],))
    target = None
    for m in mods:
      for fl in _LEAF_CANDIDATES.get(leaf, (leaf,)):
        if m + (fl,) in want:
          target = m + (fl,)
          break
      if target:
        break
    if target is None or target in seen:  # (Or a second name for one leaf.)
      unexpected.append(pt_key)
      continue
    seen.add(target)
    y = _to_flax_layout(np.asarray(x), target[-1], want[target])
    if y.shape != want[target]:
      misshaped.append(f'{pt_key} {tuple(np.shape(x))} -> {"/".join(target)} '
                       f'expects {want[target]}')
      continue
    out[target] = y.astype(np.float32)
  missing = ['/'.join(k) for k in want if k not in seen]
  if missing or unexpected or misshaped:
    lines = [f'PyTorch weights{" in " + source if source else ""} do not match the Flax model:']
    for title, items in (('missing in checkpoint', missing),
                         ('unexpected in checkpoint', unexpected),
                         ('wrong shape', misshaped)):
      if items:
        shown = ', '.join(sorted(items)[:10]) + (' ...' if len(items) > 10 else '')
        lines.append(f'  {len(items)} {title}: {shown}')
    raise ValueError('\n'.join(lines))
  return traverse_util.unflatten_dict(out)


# Flax names list submodules '<attr>_<i>' (down_blocks_0); these PyTorch
# attributes end in digits themselves (TimestepEmbedding) and stay as they are.
_PT_DIGIT_NAMES = ('linear_1', 'linear_2')
# The Flax VAE attention's names vs diffusers' PyTorch Attention.
_FLAX_ATTN_TO_PT = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def _pt_module_name(name):
  if name in _PT_DIGIT_NAMES:
    return name
  return re.sub(r'^(\w+?)_(\d+)$', r'\1.\2', name)


def _to_pt_layout(x):
  """Transposes a Flax kernel into PyTorch layout (the inverse of _to_flax_layout)."""
  if x.ndim == 4:   # Conv2d HWIO -> OIHW.
    return x.transpose(3, 2, 0, 1)
  if x.ndim == 3:   # Conv1d WIO -> OIW.
    return x.transpose(2, 1, 0)
  if x.ndim == 2:   # Dense (in, out) -> Linear (out, in).
    return x.T
  return x


def convert_flax_to_pt(params, library: str = 'diffusers',
                       dtype=np.float32) -> dict[str, np.ndarray]:
  """Flax params tree -> PyTorch state dict (numpy, contiguous, `dtype`).

  The inverse of `convert_pt_to_flax` for current diffusers/transformers
  PyTorch modules: Dense -> Linear, Conv -> Conv2d, LayerNorm/GroupNorm scale
  -> weight, Embed embedding -> weight; diffusers list submodules and VAE
  attention names as in diffusers' PyTorch classes.
  """
  if library not in ('diffusers', 'transformers'):
    raise ValueError(f"library must be 'diffusers' or 'transformers', got {library!r}.")
  out = {}
  for path, x in traverse_util.flatten_dict(flax.core.unfreeze(params)).items():
    *mod, leaf = path
    if library == 'diffusers':
      if mod and mod[-1] in _FLAX_ATTN_TO_PT:
        mod[-1] = _FLAX_ATTN_TO_PT[mod[-1]]
      mod = [_pt_module_name(m) for m in mod]
    x = np.asarray(x)
    if leaf == 'kernel':
      x, leaf = _to_pt_layout(x), 'weight'
    elif leaf in ('scale', 'embedding'):
      leaf = 'weight'
    name = '.'.join(mod + [leaf])
    if name in out:
      raise ValueError(f'Flax params {"/".join(path)} and another leaf both map to '
                       f'PyTorch {name!r}.')
    out[name] = np.ascontiguousarray(x, dtype=dtype)
  return out

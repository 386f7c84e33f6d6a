"""Torch-free weight IO: readers against known values, PyTorch -> Flax mapping."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.flax
import safetensors.numpy

from dpg_jax import weights

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')


def test_read_safetensors_matches_written(tmp_path):
  rng = np.random.default_rng(0)
  want = {'a.weight': rng.standard_normal((3, 4)).astype(np.float32),
          'b': rng.standard_normal((5,)).astype(np.float16),
          'c': np.arange(6, dtype=np.int64).reshape(2, 3),
          'd': np.array([True, False])}
  safetensors.numpy.save_file(want, str(tmp_path / 'x.safetensors'), metadata={'format': 'pt'})
  got = weights.read_state_dict(tmp_path / 'x.safetensors')
  assert set(got) == set(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape
    np.testing.assert_array_equal(got[k], v)


def test_read_safetensors_bf16(tmp_path):
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 3)), jnp.bfloat16)
  safetensors.flax.save_file({'x': x}, str(tmp_path / 'x.safetensors'))
  got = weights.read_state_dict(str(tmp_path / 'x.safetensors'))['x']
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got.astype(np.float32), np.asarray(x, np.float32))


def test_read_sharded_index(tmp_path):
  a = {'a': np.ones((2,), np.float32)}
  b = {'b': np.full((3,), 2.0, np.float32)}
  safetensors.numpy.save_file(a, str(tmp_path / 'm-00001-of-00002.safetensors'))
  safetensors.numpy.save_file(b, str(tmp_path / 'm-00002-of-00002.safetensors'))
  index = {'metadata': {}, 'weight_map': {'a': 'm-00001-of-00002.safetensors',
                                          'b': 'm-00002-of-00002.safetensors'}}
  (tmp_path / 'm.safetensors.index.json').write_text(json.dumps(index))
  got = weights.read_state_dict(tmp_path / 'm.safetensors.index.json')
  assert sorted(got) == ['a', 'b']
  np.testing.assert_array_equal(got['b'], b['b'])


def test_read_torch_bin_without_torch():
  # torch_dtypes.pt = torch.save({'state_dict': {...}, 'epoch': 3}); values
  # recorded by make_sd_fixtures.py.
  want = np.load(os.path.join(FIXTURES, 'sd_parity.npz'))
  want = {k[len('dtypes/'):]: want[k] for k in want.files if k.startswith('dtypes/')}
  path = os.path.join(FIXTURES, 'torch_dtypes.pt')
  got = weights.read_state_dict(path)  # 'state_dict' wrapper auto-unwrapped.
  assert set(got) == set(want)
  assert got['bf16'].dtype == ml_dtypes.bfloat16 and got['f16'].dtype == np.float16
  assert got['i64'].dtype == np.int64 and got['bool'].dtype == np.bool_
  assert got['scalar'].shape == ()
  for k, v in want.items():
    np.testing.assert_array_equal(np.asarray(got[k], v.dtype), v, err_msg=k)
  assert set(weights.read_state_dict(path, key='state_dict')) == set(want)
  with pytest.raises(KeyError, match='teacher'):
    weights.read_state_dict(path, key='teacher')


def test_read_torch_bin_rejects_non_zip(tmp_path):
  (tmp_path / 'old.bin').write_bytes(b'\x80\x02not a zip')
  with pytest.raises(ValueError, match='legacy'):
    weights.read_state_dict(tmp_path / 'old.bin')


class _Toy(nn.Module):

  @nn.compact
  def __call__(self, ids, img):
    x = nn.Embed(10, 4, name='embed')(ids).sum(1)
    x = nn.LayerNorm(name='norm')(x)
    x = nn.Dense(3, name='proj')(x)
    y = nn.Conv(2, (3, 3), name='conv')(img)
    y = nn.GroupNorm(num_groups=1, name='gn')(y)
    return x, [nn.Dense(2, name=f'blocks_{i}')(x) for i in range(2)], y


def _toy_shapes():
  return weights.flax_shapes(_Toy().init, jax.random.PRNGKey(0),
                             jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 5, 5, 3)))


def _toy_pt_state(rng):
  r = lambda *s: rng.standard_normal(s).astype(np.float32)
  return {'embed.weight': r(10, 4), 'norm.weight': r(4), 'norm.bias': r(4),
          'proj.weight': r(3, 4), 'proj.bias': r(3), 'conv.weight': r(2, 3, 3, 3),
          'conv.bias': r(2), 'gn.gamma': r(2), 'gn.beta': r(2),
          'blocks.0.weight': r(2, 3).astype(np.float16), 'blocks.0.bias': r(2),
          'blocks.1.weight': r(2, 3), 'blocks.1.bias': r(2),
          'embeddings.position_ids': np.arange(4)}  # A buffer: ignored.


def test_flax_shapes_no_compute():
  shapes = _toy_shapes()
  assert isinstance(shapes['proj']['kernel'], jax.ShapeDtypeStruct)
  assert shapes['conv']['kernel'].shape == (3, 3, 3, 2)


def test_convert_pt_to_flax_layouts():
  pt = _toy_pt_state(np.random.default_rng(0))
  params = weights.convert_pt_to_flax(pt, _toy_shapes(), library='diffusers')
  np.testing.assert_array_equal(params['embed']['embedding'], pt['embed.weight'])
  np.testing.assert_array_equal(params['norm']['scale'], pt['norm.weight'])
  np.testing.assert_array_equal(params['proj']['kernel'], pt['proj.weight'].T)
  np.testing.assert_array_equal(params['conv']['kernel'], pt['conv.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params['gn']['scale'], pt['gn.gamma'])
  np.testing.assert_array_equal(params['gn']['bias'], pt['gn.beta'])
  np.testing.assert_array_equal(params['blocks_0']['kernel'],
                                pt['blocks.0.weight'].astype(np.float32).T)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
  # The result has exactly the structure of the shapes tree and runs.
  assert jax.tree.structure(params) == jax.tree.structure(_toy_shapes())
  _Toy().apply({'params': params}, jnp.array([[1, 2]]), jnp.ones((1, 5, 5, 3)))


def test_convert_pt_to_flax_prefix():
  pt = {'text.' + k: v for k, v in _toy_pt_state(np.random.default_rng(0)).items()}
  pt['vision.other.weight'] = np.zeros((3, 3), np.float32)  # Outside the prefix.
  params = weights.convert_pt_to_flax(pt, _toy_shapes(), prefix='text.')
  np.testing.assert_array_equal(params['proj']['bias'], pt['text.proj.bias'])


def test_convert_pt_to_flax_reports_mismatches():
  pt = _toy_pt_state(np.random.default_rng(0))
  del pt['proj.bias']
  pt['extra.weight'] = np.zeros((1,), np.float32)
  pt['conv.bias'] = np.zeros((5,), np.float32)
  with pytest.raises(ValueError) as e:
    weights.convert_pt_to_flax(pt, _toy_shapes(), source='toy.bin')
  msg = str(e.value)
  assert 'toy.bin' in msg
  assert '1 missing in checkpoint: proj/bias' in msg
  assert '1 unexpected in checkpoint: extra.weight' in msg
  assert 'conv.bias (5,) -> conv/bias expects (2,)' in msg


def test_convert_pt_to_flax_transformers_names():
  # transformers' Flax models name list children '0', '1' (no 'blocks_0').
  class Layers(nn.Module):

    @nn.compact
    def __call__(self, x):
      for i in range(2):
        x = nn.Dense(2, name=str(i))(x)
      return x

  class Outer(nn.Module):

    @nn.compact
    def __call__(self, x):
      return Layers(name='layers')(x)

  shapes = weights.flax_shapes(Outer().init, jax.random.PRNGKey(0), jnp.zeros((1, 2)))
  rng = np.random.default_rng(0)
  pt = {f'layers.{i}.{n}': rng.standard_normal(s).astype(np.float32)
        for i in range(2) for n, s in (('weight', (2, 2)), ('bias', (2,)))}
  params = weights.convert_pt_to_flax(pt, shapes, library='transformers')
  np.testing.assert_array_equal(params['layers']['1']['kernel'], pt['layers.1.weight'].T)
  with pytest.raises(ValueError, match='unexpected'):
    weights.convert_pt_to_flax(pt, shapes, library='diffusers')


# -- Flax -> PyTorch ----------------------------------------------------------------
def test_convert_flax_to_pt_inverts_pt_to_flax():
  pt = _toy_pt_state(np.random.default_rng(0))
  params = weights.convert_pt_to_flax(pt, _toy_shapes(), library='diffusers')
  back = weights.convert_flax_to_pt(params, library='diffusers')
  # Current PyTorch names: GroupNorm gamma/beta are weight/bias; buffers dropped.
  renamed = {'gn.gamma': 'gn.weight', 'gn.beta': 'gn.bias'}
  want = {renamed.get(k, k): v.astype(np.float32) for k, v in pt.items()
          if k != 'embeddings.position_ids'}
  assert sorted(back) == sorted(want)
  for k, v in want.items():
    assert back[k].dtype == np.float32 and back[k].flags.c_contiguous, k
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  assert weights.convert_flax_to_pt(params, dtype=np.float16)['proj.weight'].dtype == np.float16


def test_convert_flax_to_pt_diffusers_and_transformers_names():
  x = np.zeros((2, 3), np.float32)
  params = {'time_embedding': {'linear_1': {'kernel': x}},
            'mid_block': {'attentions_0': {'query': {'kernel': x}, 'proj_attn': {'bias': x[0]}}},
            'down_blocks_1': {'attentions_0': {'transformer_blocks_0': {
                'attn1': {'to_out_0': {'kernel': x}}, 'ff': {'net_2': {'kernel': x}}}}}}
  assert sorted(weights.convert_flax_to_pt(params)) == [
      'down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.weight',
      'down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2.weight',
      'mid_block.attentions.0.to_out.0.bias', 'mid_block.attentions.0.to_q.weight',
      'time_embedding.linear_1.weight']
  te = {'text_model': {'encoder': {'layers': {'0': {'self_attn': {'q_proj': {'kernel': x}}}}},
                       'final_layer_norm': {'scale': x[0]},
                       'embeddings': {'token_embedding': {'embedding': x}}}}
  got = weights.convert_flax_to_pt(te, library='transformers')
  assert sorted(got) == ['text_model.embeddings.token_embedding.weight',
                         'text_model.encoder.layers.0.self_attn.q_proj.weight',
                         'text_model.final_layer_norm.weight']
  assert got['text_model.encoder.layers.0.self_attn.q_proj.weight'].shape == (3, 2)
  assert got['text_model.embeddings.token_embedding.weight'].shape == (2, 3)  # Not transposed.


# -- lazy reading, corrupt files ----------------------------------------------------
def test_read_safetensors_is_lazy(tmp_path, monkeypatch):
  want = {f'w{i}': np.full((4,), i, np.float32) for i in range(3)}
  safetensors.numpy.save_file(want, str(tmp_path / 'x.safetensors'))
  got = weights.read_state_dict(tmp_path / 'x.safetensors')
  assert isinstance(got, weights.SafetensorsStateDict) and len(got) == 3
  reads = []
  orig = weights.SafetensorsStateDict.__getitem__
  monkeypatch.setattr(weights.SafetensorsStateDict, '__getitem__',
                      lambda self, k: reads.append(k) or orig(self, k))
  assert sorted(got) == ['w0', 'w1', 'w2'] and not reads  # Listing reads no tensor.
  np.testing.assert_array_equal(got['w2'], want['w2'])
  assert reads == ['w2']


def _truncate(path, keep):
  with open(path, 'r+b') as f:
    f.truncate(keep)
  return str(path)


def test_read_truncated_or_corrupt_files_name_them(tmp_path):
  x = {'a': np.arange(1000, dtype=np.float32)}
  st = tmp_path / 'x.safetensors'
  safetensors.numpy.save_file(x, str(st))
  bad = _truncate(st, os.path.getsize(st) // 2)
  with pytest.raises(ValueError, match=rf'^{bad}: truncated or corrupt safetensors file \(.+\); '):
    weights.read_state_dict(bad)
  pt = tmp_path / 'dtypes.pt'
  pt.write_bytes(open(os.path.join(FIXTURES, 'torch_dtypes.pt'), 'rb').read())
  data = bytearray(pt.read_bytes())
  # Zeroed bytes inside the archive (a damaged copy).
  i = data.find(b'data/0') + 200
  data[i:i + 8] = bytes(8)
  (tmp_path / 'flipped.pt').write_bytes(bytes(data))
  with pytest.raises(ValueError, match=r'flipped\.pt: truncated or corrupt PyTorch checkpoint'):
    weights.read_state_dict(tmp_path / 'flipped.pt')
  cut = _truncate(pt, os.path.getsize(pt) // 2)
  with pytest.raises(ValueError, match=rf'^{cut} is not a zip-format PyTorch checkpoint: '
                     'truncated or corrupt'):
    weights.read_state_dict(cut)

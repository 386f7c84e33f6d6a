"""Mesh, rule table and FSDP: parity with replication, bytes per device, micro-batch layout.

The checks that need 8 devices run in one subprocess with 8 forced CPU devices
(the test process's jax is already initialised with its own device count).
"""
import json
import os
import subprocess
import sys
import textwrap

import jax
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from dpg_jax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORCE_8 = '--xla_force_host_platform_device_count=8'


def _env(n_devices=8):
  flags = os.environ.get('XLA_FLAGS', '').replace(FORCE_8, '')
  return dict(os.environ, JAX_PLATFORMS='cpu',
              XLA_FLAGS=f'{flags} --xla_force_host_platform_device_count={n_devices}')


def run_script(code: str, *args, n_devices=8, timeout=900) -> dict:
  """Runs `code` with n forced CPU devices; its last stdout line is JSON."""
  out = subprocess.run([sys.executable, '-c', code, *map(str, args)], cwd=REPO,
                       env=_env(n_devices), capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_mesh_sizes_fill_and_refuse():
  assert sharding.mesh_sizes(8) == {'subject': 1, 'data': 8, 'fsdp': 1}
  assert sharding.mesh_sizes(8, data=2, fsdp=-1) == {'subject': 1, 'data': 2, 'fsdp': 4}
  assert sharding.mesh_sizes(8, subject=2, data=-1, fsdp=2) == {'subject': 2, 'data': 2, 'fsdp': 2}
  with pytest.raises(ValueError, match='mesh.data and mesh.fsdp are both -1'):
    sharding.mesh_sizes(8, data=-1, fsdp=-1)
  with pytest.raises(ValueError, match='not divisible'):
    sharding.mesh_sizes(8, data=-1, fsdp=3)
  with pytest.raises(ValueError, match='needs 16 devices, 8 are available'):
    sharding.mesh_sizes(8, data=4, fsdp=4)
  with pytest.raises(ValueError, match=r'config key mesh.fsdp=0.5'):
    sharding.mesh_sizes(8, fsdp=0.5)


def test_param_rules_from_config():
  cfg = ml_collections.ConfigDict({'param_sharding': 'fsdp', 'rules': ('.*/to_k/kernel=replicate',)})
  rules = sharding.param_rules(cfg)
  assert rules[0] == ('.*/to_k/kernel', 'replicate') and rules[1:] == sharding.PARAM_RULES
  assert sharding.param_rules({'param_sharding': 'replicate'}) == ((r'.*', 'replicate'),)
  with pytest.raises(ValueError, match=r"mesh.param_sharding='zero3'"):
    sharding.param_rules({'param_sharding': 'zero3'})
  with pytest.raises(ValueError, match=r"mesh.rules\[0\]='.\*kernel': expected 'regex=strategy'"):
    sharding.param_rules({'param_sharding': 'fsdp', 'rules': ('.*kernel',)})


def test_fsdp_spec_largest_divisible_dim():
  assert sharding.fsdp_spec((3, 3, 320, 640), 8) == P(None, None, None, 'fsdp')
  assert sharding.fsdp_spec((49408, 768), 8) == P('fsdp', None)
  assert sharding.fsdp_spec((77, 768), 8) == P(None, 'fsdp')        # 77 is not divisible
  assert sharding.fsdp_spec((320,), 8) == P()                        # small: replicated
  assert sharding.fsdp_spec((3, 3, 321, 5), 8, min_elements=1) == P()  # nothing divisible
  # A stacked multi-subject leaf: the subject dim leads and is never split.
  assert sharding.fsdp_spec((4, 1280, 640), 8, lead=('subject',)) == P('subject', 'fsdp', None)


_RULES_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, '.')
    from configs import dreambooth_dpg
    from dpg_jax import bench, critic as critic_lib, dpg as dpg_lib, sharding, train
    config = dreambooth_dpg.get_config()
    sd, shapes = bench.sd14_random('float32', False, 'standard', abstract=True)
    spec = train.make_step_spec(sd, config)
    trainable = train.trainable_params(shapes, config)
    # A generic trainable subset (as LoRA / Custom Diffusion adapters name theirs),
    # and a critic state as DPG builds it.
    subset = {'unet': {'down_blocks_0': {'attentions_0': {'transformer_blocks_0': {
        'attn2': {'to_k': {'kernel': jax.ShapeDtypeStruct((768, 320), jnp.float32)},
                  'processor': {'lora_down': {'kernel': jax.ShapeDtypeStruct((768, 64), jnp.float32)},
                                'lora_up': {'kernel': jax.ShapeDtypeStruct((64, 320), jnp.float32)}}}}}}}}
    # The robust preset's critic (Adam: optimiser slots to cover too).
    critic_shapes = jax.eval_shape(lambda r: critic_lib.create_critic_state(
        critic_lib.critic_config('robust'), r, (1, 4, 64, 64)), jax.random.PRNGKey(0))
    out = {}
    for name, (data, fsdp, strategy) in {'replicated': (8, 1, 'replicate'),
                                          'fsdp8': (1, 8, 'fsdp'), 'fsdp4': (2, 4, 'fsdp')}.items():
      mesh = sharding.make_mesh(data, fsdp=fsdp)
      abstract, sh = train.abstract_state(spec, trainable, jax.random.PRNGKey(0), mesh, strategy)
      params_b = sharding.bytes_per_device(abstract.params)
      total_b = sharding.bytes_per_device((abstract.params, abstract.opt_state))
      out[name] = {'params': params_b, 'params_opt': total_b}
      if name == 'fsdp8':
        flat = jax.tree_util.tree_flatten_with_path(sh)[0]
        specs = {sharding.path_str(p): tuple(s.spec) for p, s in flat}
        out['specs'] = {k: v for k, v in specs.items() if any(s in k for s in (
            'unet/conv_in/kernel', 'unet/down_blocks_1/resnets_0/conv1/kernel', 'unet/conv_in/bias',
            'unet/down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q/kernel',
            'text_encoder/text_model/embeddings/token_embedding/embedding',
            'text_encoder/text_model/encoder/layers/0/mlp/fc1/kernel',
            'text_encoder/text_model/final_layer_norm/scale'))}
        sub = sharding.tree_shardings(mesh, {'params': subset, 'opt_state': [{'mu': subset}]}, 'fsdp',
                                      min_elements=1)
        out['subset'] = {sharding.path_str(p): tuple(s.spec)
                         for p, s in jax.tree_util.tree_flatten_with_path(sub)[0]}
        crit = sharding.tree_shardings(mesh, {'critic': {'look_forward': critic_shapes}}, 'fsdp')
        out['critic'] = {sharding.path_str(p): tuple(s.spec)
                         for p, s in jax.tree_util.tree_flatten_with_path(crit)[0]}
        out['counts'] = {'leaves': len(flat), 'sharded': sum(any(s.spec) for _, s in flat)}
    print(json.dumps(out))
''')


def test_rules_shard_sd14_state_by_the_fsdp_factor():
  """SD1.4 shapes (abstract: nothing allocated): UNet + text encoder kernels and
  their Adam slots are split on their largest divisible dim; small leaves stay
  replicated; parameter + optimiser bytes per device drop ~8x on 8 devices."""
  res = run_script(_RULES_SCRIPT)
  specs = res['specs']
  assert specs['params/unet/conv_in/kernel'] == []               # (3,3,4,320): 11,520 < 2**14
  assert specs['params/unet/down_blocks_1/resnets_0/conv1/kernel'] == [None, None, None, 'fsdp']
  assert specs['params/unet/conv_in/bias'] == []
  assert specs['params/unet/down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q/kernel'] \
      == ['fsdp', None]
  assert specs['params/text_encoder/text_model/embeddings/token_embedding/embedding'] == \
      ['fsdp', None]
  assert specs['params/text_encoder/text_model/final_layer_norm/scale'] == []
  mu = [k for k in specs if k.startswith('opt_state') and k.endswith('resnets_0/conv1/kernel')]
  assert mu and all(specs[k] == specs['params/unet/down_blocks_1/resnets_0/conv1/kernel']
                    for k in mu), specs
  # Adapter-style subsets are covered by the generic rules.
  sub = res['subset']
  assert all(v and 'fsdp' in v for k, v in sub.items()), sub
  assert any('lora_down/kernel' in k for k in sub) and any('opt_state' in k for k in sub)
  # The critic's large kernels are sharded, its biases replicated.
  crit = res['critic']
  assert any('fsdp' in v for k, v in crit.items() if k.startswith('critic/look_forward/params')
             and k.endswith('kernel')), crit
  assert any('fsdp' in v for k, v in crit.items() if '/opt_state/' in k), crit
  assert all(v == [] for k, v in crit.items() if k.endswith('bias') or 'target_stats' in k), crit
  rep, f8, f4 = res['replicated'], res['fsdp8'], res['fsdp4']
  for name, r in (('fsdp8', f8), ('fsdp4', f4)):
    print(f'SD1.4 per-device bytes {name}: params {r["params"]:,} params+opt {r["params_opt"]:,} '
          f'(replicated {rep["params_opt"]:,}, ratio {rep["params_opt"] / r["params_opt"]:.2f})')
  assert rep['params_opt'] / f8['params_opt'] > 7.8
  assert rep['params_opt'] / f4['params_opt'] > 3.9


_STEP_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, '.')
    from dpg_jax import models, sharding, train
    from tests import test_train as tt
    sd, params = models.load_stable_diffusion(sys.argv[1])
    config = tt._config(batch_size=8, grad_accum_steps=2, train_text_encoder=False)
    spec = train.make_step_spec(sd, config)
    seen = {}
    micro_grads = train._micro_grads
    def spy(spec_, params_, critic, frozen, micro, rng):
      # The sharding the partitioner chose for each micro-batch inside the step.
      jax.debug.inspect_array_sharding(micro['instance_mean'], callback=lambda s: seen.setdefault(
          'micro', []).append((len(s.device_set), list(s.shard_shape((8, 4, 8, 8))))))
      return micro_grads(spec_, params_, critic, frozen, micro, rng)
    train._micro_grads = spy
    out = {}
    for name, data, fsdp, strategy in (('replicated', 8, 1, 'replicate'), ('fsdp', 2, 4, 'fsdp')):
      mesh = sharding.make_mesh(data, fsdp=fsdp)
      # Host copies: each run's state is donated to its step.
      trainable = jax.tree.map(np.array, train.trainable_params(params, config))
      state, sh = train.create_sharded_state(spec, trainable, jax.random.PRNGKey(0), mesh, strategy)
      # Real arrays: bytes on device 0 (the replicated state holds the full tree).
      dev0 = jax.devices()[0]
      on0 = sum(s.data.nbytes for x in jax.tree.leaves((state.params, state.opt_state))
                for s in x.addressable_shards if s.device == dev0)
      step = train.compile_train_step(spec, mesh, sh)
      rng = sharding.put_global(np.asarray(jax.random.PRNGKey(1)), sharding.replicated(mesh))
      seen.clear()
      for i in range(2):
        batch = sharding.put_batch(tt._host_batch(sd, config, step=i), mesh)
        state, m = step(state, batch, rng, None)
      out[name] = {'leaves': [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(state.params)],
                   'loss': float(m['loss']), 'bytes_dev0': int(on0),
                   'predicted': sharding.bytes_per_device((state.params, state.opt_state)),
                   'micro': seen['micro'],
                   'n_sharded': sum(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
                                    for x in jax.tree.leaves(state.params))}
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(out['replicated']['leaves'], out['fsdp']['leaves']))
    for v in out.values():
      del v['leaves']
    print(json.dumps({'max_diff': diff, **out}))
''')


def test_fsdp_step_equals_replicated_and_micro_batches_stay_spread(tiny_sd_dir):
  """8 devices, 2 steps with 2 accumulated micro-batches: mesh data=2 x fsdp=4
  with sharded params == data=8 replicated (1e-5); every micro-batch inside the
  step is split over all 8 devices, 1 row each (no reshard to a subset)."""
  res = run_script(_STEP_SCRIPT, tiny_sd_dir)
  rep, fs = res['replicated'], res['fsdp']
  assert res['max_diff'] < 1e-5, res
  assert abs(rep['loss'] - fs['loss']) < 1e-5
  assert fs['n_sharded'] > 0
  # Measured bytes on a device equal the layout's prediction, and FSDP holds less.
  assert rep['bytes_dev0'] == rep['predicted'] and fs['bytes_dev0'] == fs['predicted'], res
  print(f'tiny per-device params+opt bytes: replicated {rep["bytes_dev0"]:,}, '
        f'fsdp4 {fs["bytes_dev0"]:,} (ratio {rep["bytes_dev0"] / fs["bytes_dev0"]:.2f}; small '
        'leaves stay replicated)')
  assert fs['bytes_dev0'] < rep['bytes_dev0'] / 2
  for name in ('replicated', 'fsdp'):
    micro = res[name]['micro']
    assert len(micro) == 2, micro            # 2 micro-batches traced
    assert all(n == 8 and shape[0] == 1 for n, shape in micro), (name, micro)


_MICRO_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, '.')
    from dpg_jax import sharding, train
    mesh = sharding.make_mesh(2, fsdp=4)
    x = sharding.put_batch({'x': np.arange(32.0).reshape(32, 1)}, mesh)['x']
    out = {}
    for name, fn in (('strided', lambda b: train.micro_batch(b, 4, 1)),
                     ('contiguous', lambda b: b.reshape((4, -1) + b.shape[1:])[1])):
      c = jax.jit(fn).lower(x).compile()
      y = c(x)
      txt = c.as_text()
      out[name] = {'devices': len(y.sharding.device_set), 'rows': int(y.sharding.shard_shape(y.shape)[0]),
                   'collectives': sum(txt.count(op + '(') for op in
                                      ('all-to-all', 'collective-permute', 'all-gather', 'all-reduce')),
                   # each device holds the rows it held before
                   'local': all(set(np.asarray(s.data).ravel()) <= set(np.asarray(
                       x.addressable_shards[[t.device for t in x.addressable_shards].index(s.device)].data).ravel())
                                for s in y.addressable_shards)}
    try:
      sharding.put_batch({'x': np.zeros((12, 1))}, mesh)
    except ValueError as e:
      out['refused'] = str(e)
    print(json.dumps(out))
''')


def test_micro_batch_slices_rows_where_they_are():
  """micro_batch takes every k-th row: on a data x fsdp mesh each micro-batch
  is spread over all 8 devices from the rows they hold, with no collective;
  a contiguous split (the regression) needs one."""
  res = run_script(_MICRO_SCRIPT)
  assert res['strided'] == {'devices': 8, 'rows': 1, 'collectives': 0, 'local': True}, res
  assert res['contiguous']['collectives'] > 0 or not res['contiguous']['local'], res
  assert res['refused'].startswith("batch entry 'x' has batch size 12, not divisible by the 8 "
                                   'devices of the data x fsdp axes'), res




_GATHER_SCRIPT = textwrap.dedent('''
    import json, re, sys
    import jax, numpy as np
    sys.path.insert(0, '.')
    from dpg_jax import models, sharding, train
    from tests import test_train as tt
    sd, params = models.load_stable_diffusion(sys.argv[1])
    config = tt._config(batch_size=4, train_text_encoder=False, **{'data.resolution': 32})
    spec = train.make_step_spec(sd, config)
    mesh = sharding.make_mesh(1, fsdp=4)
    trainable = train.trainable_params(params, config)
    abstract, sh = train.abstract_state(spec, trainable, jax.random.PRNGKey(0), mesh, 'fsdp')
    bsh = sharding.batch_sharded(mesh)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bsh)
             for k, v in tt._host_batch(sd, config).items()}
    rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=sharding.replicated(mesh))
    hlo = train.compile_train_step(spec, mesh, sh).lower(abstract, batch, rng, None).compile().as_text()
    gathers = [[[int(d) for d in dims.split(',') if d], int(dim)] for dims, dim in re.findall(
        r'= f32\\[([0-9,]*)\\]\\{[^}]*\\} all-gather\\(.*?dimensions=\\{([0-9]+)\\}', hlo)]
    flat = jax.tree_util.tree_flatten_with_path(sh.params)[0]
    print(json.dumps({
        'gathers': gathers,
        'weights': [list(x.shape) for x, (_, s) in zip(jax.tree.leaves(abstract.params), flat)
                    if 'fsdp' in s.spec],
        'inputs': [list(v.shape) for v in batch.values()]}))
''')


def test_fsdp_step_gathers_weights_not_activations(tiny_sd_dir, monkeypatch):
  """Compiled FSDP step (4 devices): every all-gather is of a sharded weight,
  or of the input latents (instance and class rows concatenated, as the
  replicated step does too). An activation gathered over the batch (the whole
  batch on every device, split by channel instead: what XLA chose with no
  constraints, 5.5x the replicated temporaries at SD1.4 512 px) fails."""
  # Compile-only: the fastest backend settings (the code is never run).
  monkeypatch.setenv('XLA_FLAGS', '--xla_backend_optimization_level=0 '
                     '--xla_llvm_disable_expensive_passes=true')
  res = run_script(_GATHER_SCRIPT, tiny_sd_dir, n_devices=4)
  allowed = {tuple(s) for s in res['weights'] + res['inputs']}
  weights = {tuple(s) for s in res['weights']}
  others = [g for g in res['gathers'] if tuple(g[0]) not in allowed]
  assert not others, f'activations all-gathered ([shape], dim): {others}'
  # The weights are gathered before use (not left sharded).
  assert any(tuple(shape) in weights for shape, _ in res['gathers']), res


def test_cpu_compiler_options_follow_the_mesh_and_the_model_width(tiny_sd):
  from dpg_jax import train  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(1)
  assert sharding.compiler_options(mesh) is None   # toy / tiny widths: XLA's defaults
  wide = sharding.compiler_options(mesh, wide_convs=True)
  assert wide == {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED',
                  'xla_cpu_experimental_ynn_fusion_type': ''}
  # XLA takes them (a misspelt option or value is refused at compile time).
  jax.jit(lambda x: x * 2, compiler_options=wide).lower(np.ones(3)).compile()
  from configs import tiny as tiny_config  # pylint: disable=g-import-not-at-top
  from dpg_jax import bench  # pylint: disable=g-import-not-at-top
  assert not train.make_step_spec(tiny_sd[0], tiny_config.get_config()).wide_convs
  sd14 = bench.sd14_random('float32', False, 'standard', abstract=True)[0]   # shapes only
  assert train.make_step_spec(sd14, tiny_config.get_config()).wide_convs
  assert train.WIDE_CONV_CHANNELS <= 320   # SD1.x's narrowest block

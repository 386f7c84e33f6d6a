"""LoRA: diffusers' file format and outputs, the adapted step, round trips, bad config."""
import dataclasses
import functools
import json
import os

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors

from configs import lora as lora_config
from configs import lora_dpg
from dpg_jax import adapters
from dpg_jax import lora
from dpg_jax import train

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'peft')
LORA_FILE = os.path.join(FIXTURES, 'lora', lora.WEIGHT_NAME)


def _fixture_shapes():
  with safetensors.safe_open(LORA_FILE, framework='numpy') as f:
    return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_our_lora_file_has_diffusers_names_and_shapes(tiny_sd, tmp_path):
  """Rank 4 on UNet + text encoder: exactly the keys and shapes diffusers + peft wrote."""
  _, params = tiny_sd
  method = lora.LoRA(rank=4, alpha=8.0, components=('unet', 'text_encoder'))
  trainable = method.init_trainable(params, jax.random.PRNGKey(0))
  method.save_delta(str(tmp_path), jax.device_get(trainable))
  with safetensors.safe_open(str(tmp_path / lora.WEIGHT_NAME), framework='numpy') as f:
    ours = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    meta = json.loads(f.metadata()['lora_adapter_metadata'])
  assert ours == _fixture_shapes()
  assert len(ours) == 80   # 8 attention layers x 4 projections + 2 x 4 in the text encoder, A and B
  assert meta['unet.lora_alpha'] == 8.0 and meta['unet.r'] == 4
  assert meta['text_encoder.lora_alpha'] == 8.0


@pytest.fixture(scope='module')
def diffusers_lora(tiny_sd):
  """(LoRA, trainable) read from the diffusers-made fixture, and its torch outputs."""
  method, tree = lora.read_lora_file(LORA_FILE)
  lora.check_targets(tree, tiny_sd[1], LORA_FILE)
  return method, jax.tree.map(jnp.asarray, tree), np.load(os.path.join(FIXTURES, 'parity.npz'))


def test_diffusers_lora_reproduces_peft_outputs(tiny_sd, diffusers_lora):
  """Merged into the kernels: PyTorch peft's UNet and CLIP outputs on the same inputs."""
  sd, params = tiny_sd
  method, trainable, ref = diffusers_lora
  assert (method.rank, method.alpha, method.components) == (4, 8.0, ('unet', 'text_encoder'))
  merged = method.merge(params, trainable)
  x, t, ctx = ref['latents'], ref['t'], ref['context']
  eps = jax.jit(sd.predict)(merged['unet'], x, t, ctx)
  # Flax's GEGLU uses tanh-GELU where PyTorch's is exact: ~1e-4 on these outputs
  # of ~1, and up to 2.1e-4 on some CPUs (seen on one element of 256).
  np.testing.assert_allclose(eps, ref['lora_eps'], atol=3e-4, rtol=1e-4)
  te = jax.jit(sd.encode_text)(merged['text_encoder'], ref['ids'])
  np.testing.assert_allclose(te, ref['lora_te'], atol=2e-4, rtol=1e-4)
  # (The step's interceptor form equals the merge: test_lora_interceptor_dropout_and_merge_on_a_block.)
  # The adapters matter: the base model's output is far from the adapted one.
  base = jax.jit(sd.predict)(params['unet'], x, t, ctx)
  assert float(np.abs(base - ref['lora_eps']).max()) > 1e-2


def test_lora_file_round_trip(tiny_sd, diffusers_lora, tmp_path):
  _, params = tiny_sd
  method, trainable, _ = diffusers_lora
  trainable = jax.tree.map(lambda x: x + 0.5, trainable)  # B non-zero: a real delta
  out = adapters.export_delta(str(tmp_path / 'export'), method, trainable,
                              {'pretrained': 'base'})
  assert adapters.is_delta_dir(out)
  back_method, back = lora.read_lora_file(os.path.join(out, lora.WEIGHT_NAME))
  assert back_method == dataclasses.replace(method, dropout=0.0)
  flat, flat_back = (traverse_util.flatten_dict(jax.device_get(t)) for t in (trainable, back))
  assert flat.keys() == flat_back.keys()
  for k in flat:
    np.testing.assert_array_equal(flat[k], flat_back[k])
  del params


def test_old_lora_down_up_naming_and_alpha_keys_load(tmp_path, diffusers_lora):
  """The older diffusers naming (`.lora.down.weight`, `.alpha`) reads as the same adapters."""
  _, trainable, _ = diffusers_lora
  state = lora.LoRA(rank=4, alpha=8.0, components=('unet', 'text_encoder')).state_dict(
      jax.device_get(trainable))
  old = {k.replace('.lora_A.weight', '.lora.down.weight').replace('.lora_B.weight',
                                                                  '.lora.up.weight'): v
         for k, v in state.items()}
  old['unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.alpha'] = np.float32(2.0)
  old['text_encoder.text_model.encoder.layers.0.self_attn.q_proj.alpha'] = np.float32(2.0)
  path = str(tmp_path / 'old.safetensors')
  safetensors.numpy.save_file({k: np.asarray(v) for k, v in old.items()}, path)
  method, tree = lora.read_lora_file(path)
  assert (method.rank, method.alpha) == (4, 2.0)
  assert jax.tree.structure(tree) == jax.tree.structure(jax.device_get(trainable))


# -----------------------------------------------------------------------------
# The step.
# -----------------------------------------------------------------------------
def _step_config(dpg_rewards=None, **finetune):
  c = lora_dpg.get_config('tiny') if dpg_rewards else lora_config.get_config('tiny')
  c.batch_size = 2
  c.warmup_steps = 0
  c.data.random_flip = False
  if dpg_rewards:
    c.dpg.rewards = dpg_rewards
  for k, v in finetune.items():
    c.finetune[k] = v
  return c


def one_step(tiny_sd, config, workdir):
  """(method, base params, state before, state after, metrics) of one jitted step."""
  from dpg_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from dpg_jax import dpg as dpg_lib  # pylint: disable=g-import-not-at-top
  sd, params = tiny_sd
  sd, params, method = adapters.build(config, sd, dict(params))
  rs = np.random.RandomState(0)
  refs = rs.randint(0, 256, (3, 64, 64, 3)).astype(np.uint8)
  dpg = (dpg_lib.DPG.build(config, sd, refs, ['a photo of sks toy'], workdir)
         if config.dpg.enabled else None)
  spec = train.make_step_spec(sd, config, dpg, method)
  trainable = method.init_trainable(params, jax.random.PRNGKey(1))
  if method.name == 'lora':  # B = 0 would leave A's gradient zero: start from a live adapter
    trainable = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 if p[-1].key == 'lora_b' else x, trainable)
  state = train.init_state(spec, trainable, jax.random.PRNGKey(0))
  h = config.data.resolution // sd.vae_scale
  lat = lambda n: rs.randn(n, 4, h, h).astype(np.float32)
  latents = data_lib.SubjectLatents(lat(3), np.full((3, 4, h, h), .05, np.float32),
                                    lat(4), np.full((4, 4, h, h), .05, np.float32))
  prompt = f'a photo of {config.data.identifier} toy'
  cond = train.conditioning_rows(sd, params['text_encoder'], config,
                                 sd.tokenize([prompt, 'a photo of toy']))
  batch = train.host_batch(latents, cond, step=1, config=config)
  frozen = dict(dpg.frozen_inputs(params) if dpg else {}, peft=method.frozen_base(params))
  before = jax.device_get(state)
  base_before = jax.device_get(params)
  step = jax.jit(functools.partial(train.train_step, spec), donate_argnums=(0,))
  new, metrics = step(state, batch, jax.random.PRNGKey(2), frozen)
  # The frozen base is a step input, never donated: still readable and unchanged.
  for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(jax.device_get(params))):
    np.testing.assert_array_equal(a, b)
  return method, base_before, before, jax.device_get(new), jax.device_get(metrics)


@pytest.fixture(scope='module')
def lora_step(tiny_sd, tmp_path_factory):
  # DPG with adapters is the Custom Diffusion step's test (and the slow reward matrix).
  return one_step(tiny_sd, _step_config(None, lora_text_encoder=True, lora_dropout=0.1),
                  str(tmp_path_factory.mktemp('lora_step')))


def test_lora_step_trains_exactly_the_adapters(lora_step):
  method, base, before, after, metrics = lora_step
  assert bool(metrics['finite'])
  # Every adapter leaf (UNet and text encoder) moved; the state holds nothing else.
  flat_b, flat_a = (traverse_util.flatten_dict(s.params) for s in (before, after))
  assert flat_b.keys() == flat_a.keys()
  assert {k[0] for k in flat_a} == {'unet', 'text_encoder'}
  assert {k[-1] for k in flat_a} == {'lora_a', 'lora_b'}
  for k in flat_a:
    assert np.abs(flat_a[k] - flat_b[k]).max() > 0, k
  # Optimiser state: Adam's two moments of exactly the adapters (plus the step counts).
  params_bytes = adapters.tree_bytes(after.params)
  opt_bytes = adapters.tree_bytes(after.opt_state)
  assert 2 * params_bytes <= opt_bytes <= 2 * params_bytes + 64
  assert params_bytes < adapters.tree_bytes(base['unet']) / 10
  # The merged model differs from the base exactly in the adapted kernels.
  merged = jax.device_get(method.merge(base, after.params))
  for comp in ('unet', 'text_encoder', 'vae'):
    adapted = {p for p in lora.target_kernels(comp, base)} if comp != 'vae' else set()
    for path, x in traverse_util.flatten_dict(base[comp]).items():
      y = traverse_util.flatten_dict(merged[comp])[path]
      if path[-1] == 'kernel' and path[:-1] in adapted:
        assert np.abs(x - y).max() > 0, path
      else:
        np.testing.assert_array_equal(x, y, err_msg=str(path))


def test_lora_interceptor_dropout_and_merge_on_a_block():
  """On a diffusers transformer block: the interceptor adds (alpha/r) x A B (= the merged
  kernel, and lora_form='merge'), dropout masks the adapter input with a fresh mask per key."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import test_custom_diffusion  # pylint: disable=g-import-not-at-top
  block, params, x, ctx = test_custom_diffusion._block()  # pylint: disable=protected-access
  rs = np.random.RandomState(0)
  tree = {attn: {proj: {'lora_a': jnp.asarray(rs.randn(32, 2), jnp.float32),
                        'lora_b': jnp.asarray(rs.randn(2, 32), jnp.float32)}
                 for proj in lora.UNET_TARGETS} for attn in ('attn1', 'attn2')}
  tree['attn2'] = {k: v for k, v in tree['attn2'].items() if k != 'to_k'}
  method = lora.LoRA(rank=2, alpha=3.0, dropout=0.5)

  def run(m, key):
    with nn.intercept_methods(m.interceptor(tree, key)):
      return block.apply({'params': params}, x, ctx)

  p1, p2 = run(method, jax.random.PRNGKey(0)), run(method, jax.random.PRNGKey(1))
  assert float(jnp.abs(p1 - p2).max()) > 1e-3   # different dropout masks
  no_drop = dataclasses.replace(method, dropout=0.0)
  merged = no_drop.merge({'unet': params}, {'unet': tree})['unet']
  want = block.apply({'params': merged}, x, ctx)
  np.testing.assert_allclose(run(no_drop, jax.random.PRNGKey(0)), want, atol=1e-4, rtol=1e-4)
  assert float(jnp.abs(want - block.apply({'params': params}, x, ctx)).max()) > 1e-2
  kernel = lambda t, a, p: np.asarray(t[a][p]['kernel'])
  np.testing.assert_array_equal(kernel(merged, 'attn2', 'to_k'), kernel(params, 'attn2', 'to_k'))
  np.testing.assert_allclose(
      kernel(merged, 'attn1', 'to_q'),
      kernel(params, 'attn1', 'to_q') + 1.5 * tree['attn1']['to_q']['lora_a'] @
      tree["attn1"]["to_q"]["lora_b"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('overrides, message', [
    ({'finetune.lora_rank': 0}, 'finetune.lora_rank=0'),
    ({'finetune.lora_alpha': -1.0}, 'finetune.lora_alpha=-1.0'),
    ({'finetune.lora_dropout': 1.0}, 'finetune.lora_dropout=1.0'),
    ({'finetune.method': 'qlora'}, "finetune.method='qlora'"),
    ({'finetune.lora_form': 'fused'}, "finetune.lora_form='fused'"),
    ({'finetune.lora_form': 'merge', 'finetune.lora_dropout': 0.1}, "lora_form='merge' forms"),
    ({'train_text_encoder': True}, 'train_text_encoder=True'),
])
def test_bad_lora_config_is_one_line_error(overrides, message):
  c = lora_config.get_config('tiny')
  c.update_from_flattened_dict(overrides)
  with pytest.raises(ValueError, match=message.replace('(', r'\(')) as e:
    train.validate_config(c)
  assert '\n' not in str(e.value)


def test_changed_lora_rank_is_refused_on_resume():
  from dpg_jax import run_config  # pylint: disable=g-import-not-at-top
  old = run_config.config_dict(lora_config.get_config('tiny'))
  new = lora_config.get_config('tiny')
  new.finetune.lora_rank = 8
  with pytest.raises(run_config.ConfigMismatchError, match='finetune.lora_rank: 4 -> 8'):
    run_config.check_resume(old, new, where='x')


# -----------------------------------------------------------------------------
# End to end (slow: each compiles a train step and a sampler).
# -----------------------------------------------------------------------------
def _tiny_run(config, workdir, steps=4):
  c = config
  c.num_steps = steps
  c.checkpoint_every = steps
  c.log_every = 1
  c.sample_every = 0
  c.sample.num_images_per_prompt = 1
  c.data.num_class_images = 2
  c.data.class_sample_steps = 2
  train.train_and_evaluate(c, workdir)
  return c


@pytest.mark.slow
@pytest.mark.parametrize('name', ['lora', 'lora_dpg'])
def test_lora_configs_train_export_and_sample(name, tmp_path):
  from dpg_jax import sample as sample_lib  # pylint: disable=g-import-not-at-top
  config = (lora_config if name == 'lora' else lora_dpg).get_config('tiny')
  c = _tiny_run(config, str(tmp_path))
  export = tmp_path / 'export'
  assert (export / lora.WEIGHT_NAME).stat().st_size < 200_000
  sd, params, info = sample_lib.load_trained(str(tmp_path), c)
  assert info['weights'] == 'export'
  metrics = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert all(np.isfinite(m['loss']) for m in metrics)
  del sd, params


def _fixture_script():
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(FIXTURES), 'make_peft_fixtures.py')
  spec = importlib.util.spec_from_file_location('make_peft_fixtures', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('name', ['lora', 'custom_diffusion'])
def test_pytorch_diffusers_loads_our_export(tiny_sd, tmp_path, name):
  """The recorded check (make_peft_fixtures.py ours/check): diffusers' own loaders
  (load_lora_weights; load_attn_procs + load_textual_inversion) installed our
  exported files and computed our outputs. Our export of the same delta today
  holds exactly the tensors and metadata checked."""
  script = _fixture_script()
  record = json.load(open(script.CHECK_JSON))[name]
  assert record['ids_equal']
  assert record['unet_eps_max_abs_diff'] < 1e-3 < record['unet_eps_max_abs']
  assert record['text_encoder_max_abs_diff'] < 1e-4
  assert record['processors'] == (['CustomDiffusionAttnProcessor'] if name == 'custom_diffusion'
                                  else ['AttnProcessor2_0'])
  method, trainable, _, _ = script.ours_deltas(tiny_sd)[name]
  out = adapters.export_delta(str(tmp_path / name), method, trainable, {'pretrained': 'tiny'})
  for f, digest in record['content_sha256'].items():
    assert script.content_digest(os.path.join(out, f)) == digest, f


@pytest.mark.slow
@pytest.mark.parametrize('rewards', ['look_forward:1.0', 'dino:1.0', 'clip_image:1.0',
                                     'clip_text:1.0', 'peft_test_host:1.0'])
@pytest.mark.parametrize('method', ['lora', 'custom_diffusion'])
def test_every_dpg_reward_trains_only_the_adapters(tiny_sd, tmp_path, method, rewards):
  """Each reward's policy gradient reaches the method's parameters and nothing else."""
  from configs import custom_diffusion_dpg  # pylint: disable=g-import-not-at-top
  from dpg_jax import rewards as rewards_lib  # pylint: disable=g-import-not-at-top
  rewards_lib.register_host_reward(
      'peft_test_host', lambda images, prompts: images.mean(axis=(1, 2, 3)) / 255.0,
      overwrite=True)
  c = custom_diffusion_dpg.get_config('tiny') if method == 'custom_diffusion' else \
      lora_dpg.get_config('tiny')
  c.batch_size, c.warmup_steps, c.dpg.rewards = 2, 0, rewards
  c.dpg.instance_mse_weight = 0.0   # the reward's term alone moves the policy
  c.prior_loss_weight = 0.0
  m, base, before, after, metrics = one_step(tiny_sd, c, str(tmp_path))
  assert bool(metrics['finite'])
  flat_b, flat_a = (traverse_util.flatten_dict(s.params) for s in (before, after))
  moved = [k for k in flat_a if np.abs(flat_a[k] - flat_b[k]).max() > 0]
  assert moved, 'the reward moved no trainable parameter'
  assert adapters.tree_bytes(after.opt_state) <= 2 * adapters.tree_bytes(after.params) + 64
  del m, base


def test_sampler_loads_a_diffusers_lora_folder(tiny_sd, tmp_path, diffusers_lora):
  """--mode=sample with sample.source = a folder holding only diffusers' LoRA file:
  the base comes from the config, the adapters are merged as peft applies them."""
  import shutil  # pylint: disable=g-import-not-at-top
  from dpg_jax import sample as sample_lib  # pylint: disable=g-import-not-at-top
  sd, params = tiny_sd
  shutil.copy(LORA_FILE, tmp_path / lora.WEIGHT_NAME)
  c = lora_config.get_config('tiny')
  c.model.tiny, c.model.pretrained = '', sd.source
  _, got, info = sample_lib.load_trained(str(tmp_path), c)
  assert info['weights'] == 'pipeline'
  method, trainable, _ = diffusers_lora
  want = jax.device_get(method.merge(params, trainable))
  for comp in ('unet', 'text_encoder', 'vae'):
    for a, b in zip(jax.tree.leaves(want[comp]), jax.tree.leaves(jax.device_get(got[comp]))):
      np.testing.assert_array_equal(a, b)

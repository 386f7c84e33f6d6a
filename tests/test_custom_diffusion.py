"""Custom Diffusion: the new token, the selected layers, diffusers' files and outputs, round trips."""
import json
import os
import shutil

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors

from configs import custom_diffusion as cd_config
from configs import custom_diffusion_dpg
from configs import custom_diffusion_dpg_dino
from dpg_jax import adapters
from dpg_jax import checkpoint as ckpt_lib
from dpg_jax import custom_diffusion
from dpg_jax import train
import test_lora  # the sibling module (pytest puts tests/ on sys.path): shared step helpers

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'peft')
CD_DIR = os.path.join(FIXTURES, 'custom_diffusion')


def _built(tiny_sd, **finetune):
  c = cd_config.get_config('tiny')
  for k, v in finetune.items():
    c.finetune[k] = v
  sd, params = tiny_sd
  return (c,) + adapters.build(c, sd, dict(params))


def test_new_token_gets_a_new_id_and_the_initializer_row(tiny_sd):
  c, sd, params, method = _built(tiny_sd)
  base_sd, base_params = tiny_sd
  v0 = base_params['text_encoder']['text_model']['embeddings']['token_embedding'][
      'embedding'].shape[0]
  assert method.first_new_id == v0 and sd.text_encoder.config.vocab_size == v0 + 1
  ids = sd.tokenize(['a photo of <new1> dog'])[0]
  assert v0 in ids.tolist()
  # The base tokenizer is untouched (the grown one is a copy).
  assert v0 not in base_sd.tokenize(['a photo of <new1> dog'])[0].tolist()
  table = params['text_encoder']['text_model']['embeddings']['token_embedding']['embedding']
  init_id = sd.tokenizer.encode('toy', add_special_tokens=False)[0]
  np.testing.assert_array_equal(table[v0], table[init_id])
  trainable = method.init_trainable(params, None)
  assert trainable['token_embedding'].shape == (1, table.shape[1])
  # Trainable: attn2 to_k / to_v of every transformer block (4 in the tiny UNet).
  paths = list(traverse_util.flatten_dict(trainable['unet']))
  assert len(paths) == 8 and all(p[-3] == 'attn2' and p[-2] in ('to_k', 'to_v') for p in paths)
  del c


def test_crossattn_also_trains_q_and_out(tiny_sd):
  _, _, params, method = _built(tiny_sd, freeze_model='crossattn')
  paths = traverse_util.flatten_dict(method.init_trainable(params, None)['unet'])
  assert {p[-2] for p in paths} == {'to_k', 'to_v', 'to_q', 'to_out_0'}
  assert len(paths) == 4 * 5   # to_out.0 has a bias


@pytest.mark.parametrize('overrides, message', [
    ({'finetune.freeze_model': 'all'}, "finetune.freeze_model='all'"),
    ({'finetune.modifier_token': ''}, "finetune.modifier_token=''"),
    ({'finetune.modifier_token': '<new1>+<new2>', 'finetune.initializer_token': 'toy'},
     "finetune.initializer_token='toy'"),
    ({'data.identifier': 'sks'}, "data.identifier='sks'"),
    ({'train_text_encoder': True}, 'train_text_encoder=True'),
])
def test_bad_custom_diffusion_config_is_one_line_error(overrides, message):
  c = cd_config.get_config('tiny')
  c.update_from_flattened_dict(overrides)
  with pytest.raises(ValueError, match=message) as e:
    train.validate_config(c)
  assert '\n' not in str(e.value)


def test_initializer_of_several_tokens_and_known_modifier_are_refused(tiny_sd):
  with pytest.raises(ValueError, match="initializer_token: 'ktn' .* is 3 tokens"):
    _built(tiny_sd, initializer_token='ktn')
  c = cd_config.get_config('tiny')
  c.finetune.modifier_token = c.data.identifier = 'dog</w>'
  with pytest.raises(ValueError, match="'dog</w>' is already a token"):
    adapters.build(c, *tiny_sd)


def test_our_files_have_diffusers_names_and_shapes(tiny_sd, tmp_path):
  """crossattn: the keys diffusers' save_attn_procs wrote (plus attn1 markers it drops)."""
  _, _, params, method = _built(tiny_sd, freeze_model='crossattn')
  method.save_delta(str(tmp_path), jax.device_get(method.init_trainable(params, None)))
  shapes = lambda path: {k: tuple(f.get_slice(k).get_shape())
                         for f in [safetensors.safe_open(path, framework='numpy')]
                         for k in f.keys()}
  ours = shapes(str(tmp_path / custom_diffusion.WEIGHT_NAME))
  theirs = shapes(os.path.join(CD_DIR, custom_diffusion.WEIGHT_NAME))
  markers = {k for k, s in ours.items() if s == (0,)}
  assert {k: s for k, s in ours.items() if k not in markers} == theirs
  assert sorted(markers) == sorted(k.rsplit('.attn2.', 1)[0] + '.attn1.processor'
                                   for k in theirs if k.endswith('to_k_custom_diffusion.weight'))
  assert shapes(str(tmp_path / '<new1>.safetensors')) == shapes(
      os.path.join(CD_DIR, '<new1>.safetensors')) == {'<new1>': (32,)}


def test_diffusers_files_reproduce_the_torch_outputs(tiny_sd):
  """A diffusers-made delta (no adapter_config.json) applied by our Flax path."""
  ref = np.load(os.path.join(FIXTURES, 'parity.npz'))
  sd, params, method = adapters.load_delta_dir(CD_DIR, lambda base: tiny_sd)
  assert method.freeze_model == 'crossattn' and method.modifier_tokens == ('<new1>',)
  ids = sd.tokenize(['a photo of <new1> dog'])
  np.testing.assert_array_equal(ids, ref['new_ids'])
  predict = jax.jit(sd.predict)
  eps = predict(params['unet'], ref['latents'], ref['t'], ref['context'])
  # fp32 summation order (XLA vs torch's SDPA): ~3e-4 on outputs of ~1.
  np.testing.assert_allclose(eps, ref['cd_eps'], atol=1e-3, rtol=1e-3)
  base = predict(tiny_sd[1]['unet'], ref['latents'], ref['t'], ref['context'])
  assert float(np.abs(base - ref['cd_eps']).max()) > 0.1   # the delta matters
  te = jax.jit(sd.encode_text)(params['text_encoder'], ids)
  np.testing.assert_allclose(te, ref['cd_te'], atol=2e-4, rtol=1e-4)


def _block():
  """A diffusers Flax transformer block (attn1, attn2/to_k, ...), the UNet's attention unit."""
  from diffusers.models.attention_flax import FlaxBasicTransformerBlock  # pylint: disable=g-import-not-at-top
  block = FlaxBasicTransformerBlock(dim=32, n_heads=2, d_head=16)
  x, ctx = jnp.ones((1, 16, 32)), jax.random.normal(jax.random.PRNGKey(0), (1, 77, 32))
  return block, block.init(jax.random.PRNGKey(1), x, ctx)['params'], x, ctx


def test_start_token_key_and_value_carry_no_gradient():
  """Context enters a block only through attn2's k/v: its start token gets no gradient."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  block, params, x, ctx = _block()

  def loss(c, detach):
    if not detach:
      return jnp.sum(block.apply({'params': params}, x, c) ** 2)
    with nn.intercept_methods(custom_diffusion.CustomDiffusion.detach_start_token):
      return jnp.sum(block.apply({'params': params}, x, c) ** 2)

  g = jax.grad(loss)(ctx, True)
  assert float(jnp.abs(g[:, 0]).max()) == 0.0
  assert float(jnp.abs(g[:, 1:]).max()) > 0.0
  assert float(jnp.abs(jax.grad(loss)(ctx, False)[:, 0]).max()) > 0.0
  # Values are untouched: only the gradient is stopped.
  np.testing.assert_array_equal(loss(ctx, True), loss(ctx, False))


@pytest.fixture(scope='module')
def cd_dpg_step(tiny_sd, tmp_path_factory):
  c = custom_diffusion_dpg.get_config('tiny')
  c.batch_size = 2
  c.warmup_steps = 0
  return test_lora.one_step(tiny_sd, c, str(tmp_path_factory.mktemp('cd_step')))


def test_cd_dpg_step_changes_exactly_the_selected_params(cd_dpg_step):
  method, base, before, after, metrics = cd_dpg_step
  assert bool(metrics['finite'])
  assert float(metrics['dpg/q_look_forward']) != 0.0
  flat_b, flat_a = (traverse_util.flatten_dict(s.params) for s in (before, after))
  for k in flat_a:
    assert np.abs(flat_a[k] - flat_b[k]).max() > 0, k
  opt_bytes, params_bytes = (adapters.tree_bytes(x) for x in (after.opt_state, after.params))
  assert 2 * params_bytes <= opt_bytes <= 2 * params_bytes + 64
  merged = jax.device_get(method.merge(base, after.params))
  for comp in ('unet', 'text_encoder', 'vae'):
    flat_m = traverse_util.flatten_dict(merged[comp])
    for path, x in traverse_util.flatten_dict(base[comp]).items():
      if comp == 'unet' and method.is_selected(path):
        assert np.abs(x - flat_m[path]).max() > 0, path
      elif path[-1] == 'embedding' and path[-2] == 'token_embedding':
        first = method.first_new_id   # only the new token's row moved
        np.testing.assert_array_equal(x[:first], flat_m[path][:first])
        assert np.abs(x[first:] - flat_m[path][first:]).max() > 0
      else:
        np.testing.assert_array_equal(x, flat_m[path], err_msg=str(path))


def test_new_token_round_trips_checkpoint_export_and_reload(tiny_sd, tmp_path):
  """Trained rows and kernels -> Orbax checkpoint -> our export -> sample's loader: exact."""
  from dpg_jax import sample as sample_lib  # pylint: disable=g-import-not-at-top
  c, sd, params, method = _built(tiny_sd)
  c.model.pretrained = ''
  spec = train.make_step_spec(sd, c, None, method)
  trainable = jax.tree.map(lambda x: x + 0.25, method.init_trainable(params, None))
  state = train.init_state(spec, trainable, jax.random.PRNGKey(0))
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'checkpoints'), async_save=False)
  ckpt.save(3, state, {'step': 3})
  ckpt.close()
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'checkpoints'), async_save=False)
  restored = ckpt.restore_subtree(3, 'params')
  ckpt.close()
  for a, b in zip(jax.tree.leaves(jax.device_get(trainable)), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)
  out = adapters.export_delta(str(tmp_path / 'export'), method, restored,
                              {'pretrained': sd.source})
  record = json.load(open(os.path.join(out, adapters.ADAPTER_CONFIG)))
  assert record['modifier_tokens'] == ['<new1>']
  sd2, params2, info = sample_lib.load_trained(str(tmp_path), c)
  assert info['weights'] == 'export'
  want = jax.device_get(method.merge(params, restored))
  got = jax.device_get(params2)
  for comp in ('unet', 'text_encoder'):
    fw, fg = (traverse_util.flatten_dict(t[comp]) for t in (want, got))
    assert fw.keys() == fg.keys()
    for k in fw:
      np.testing.assert_array_equal(fw[k], fg[k], err_msg=str(k))
  np.testing.assert_array_equal(sd2.tokenize(['a <new1> toy']), sd.tokenize(['a <new1> toy']))
  # Without the export the checkpoint is the newest: the same weights from there.
  shutil.rmtree(out)
  _, params3, info = sample_lib.load_trained(str(tmp_path), _with_base(c, sd.source))
  assert info['weights'] == 'checkpoint'
  for a, b in zip(jax.tree.leaves(got['unet']), jax.tree.leaves(jax.device_get(params3['unet']))):
    np.testing.assert_array_equal(a, b)


def _with_base(c, source):
  c = c.copy_and_resolve_references()
  c.model.tiny = ''
  c.model.pretrained = source
  return c


def test_changed_modifier_token_is_refused_on_resume():
  from dpg_jax import run_config  # pylint: disable=g-import-not-at-top
  old = run_config.config_dict(cd_config.get_config('tiny'))
  new = cd_config.get_config('tiny')
  new.finetune.freeze_model = 'crossattn'
  with pytest.raises(run_config.ConfigMismatchError, match='finetune.freeze_model'):
    run_config.check_resume(old, new, where='x')


# -----------------------------------------------------------------------------
# End to end (slow: each compiles a train step and a sampler).
# -----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize('module', [cd_config, custom_diffusion_dpg, custom_diffusion_dpg_dino],
                         ids=['custom_diffusion', 'custom_diffusion_dpg',
                              'custom_diffusion_dpg_dino'])
def test_custom_diffusion_configs_train_export_and_sample(module, tmp_path):
  from dpg_jax import sample as sample_lib  # pylint: disable=g-import-not-at-top
  c = test_lora._tiny_run(module.get_config('tiny'), str(tmp_path))  # pylint: disable=protected-access
  export = tmp_path / 'export'
  assert sorted(os.listdir(export)) == ['<new1>.safetensors', adapters.ADAPTER_CONFIG,
                                        custom_diffusion.WEIGHT_NAME]
  sd, params, info = sample_lib.load_trained(str(tmp_path), c)
  assert info['weights'] == 'export' and sd.text_encoder.config.vocab_size == 625
  del params


# -----------------------------------------------------------------------------
# Their data recipe (dpg_jax/scale_augment.py).
# -----------------------------------------------------------------------------
def test_scale_augment_crops_masks_and_prompt_words():
  from dpg_jax import scale_augment  # pylint: disable=g-import-not-at-top
  rs = np.random.RandomState(0)
  images = rs.randint(1, 255, (3, 64, 64, 3)).astype(np.uint8)
  crops, masks, prefix = scale_augment.crop_bank(images, per_image=40, seed=0, latent_scale=8,
                                                 random_flip=False)
  assert crops.shape == (120, 64, 64, 3) and masks.shape == (120, 1, 8, 8)
  blank = np.all(np.abs(crops.astype(int) - 128) <= 1, axis=-1)   # pasted-on canvas
  for c, m, p, b in zip(crops, masks, prefix, blank):
    if p in (3, 4):   # zoomed in / close up: a crop of a bigger image, all valid
      assert m.min() == 1.0 and not b.any()
    else:             # the image pasted at a random place; the mask lies inside it
      assert (m[0] == 1).sum() < 64
      assert not b.reshape(8, 8, 8, 8).transpose(0, 2, 1, 3).reshape(8, 8, 64).all(-1)[
          m[0] == 1].any()
      if p in (1, 2):   # far away / very small: under 0.6 of the canvas
        assert b.mean() > 1 - 0.6 ** 2 - 0.05
  assert set(prefix.tolist()) == {0, 1, 2, 3, 4}
  # Zoom-ins are about a third of the draws, as theirs (p = 0.34).
  assert 0.2 < np.isin(prefix, [3, 4]).mean() < 0.5
  # masked_mse: the mean over the valid region, per example.
  pred, target = np.zeros((2, 4, 8, 8)), np.ones((2, 4, 8, 8))
  target[0, :, :4] = 3.0
  mask = np.zeros((2, 1, 8, 8))
  mask[0, :, :4] = 1.0
  mask[1] = 1.0
  assert float(scale_augment.masked_mse(pred, target, mask)) == pytest.approx((9.0 + 1.0) / 2)


def test_augmented_batches_carry_each_rows_prompt_and_captioned_priors(tiny_sd, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from dpg_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from dpg_jax import scale_augment  # pylint: disable=g-import-not-at-top
  c, sd, params, _ = _built(tiny_sd)
  rs = np.random.RandomState(1)
  (tmp_path / 'images').mkdir()
  captions = ['a red toy', 'a toy on the grass', 'a blue cube']
  for i in range(3):
    Image.fromarray(rs.randint(0, 255, (70, 90, 3)).astype(np.uint8)).save(
        tmp_path / 'images' / f'{i}.png')
  (tmp_path / 'images.txt').write_text(''.join(f'images/{i}.png\n' for i in range(3)))
  (tmp_path / 'caption.txt').write_text('\n'.join(captions) + '\n')
  c.data.real_prior, c.data.class_dir, c.data.augment_bank = True, str(tmp_path), 2
  train.validate_config(c)
  images = rs.randint(0, 255, (2, 64, 64, 3)).astype(np.uint8)
  h = 8
  plain = data_lib.SubjectLatents(np.zeros((2, 4, h, h), np.float32),
                                  np.zeros((2, 4, h, h), np.float32))
  latents, tables = scale_augment.prepare(
      c, sd, params, images, plain,
      lambda: scale_augment.read_captioned_dir(str(tmp_path), 64, center_crop=True, seed=0),
      text_in_step=True)
  assert latents.num_instance == 4 and latents.num_class == 3
  assert tables['instance_ids'].shape == (5, 77) and tables['class_ids'].shape == (3, 77)
  np.testing.assert_array_equal(tables['class_ids'], sd.tokenize(captions))
  for step in range(1, 4):
    b = train.host_batch(latents, tables, step=step, config=c)
    assert b['instance_mask'].shape == (2, 1, h, h) and b['class_ids'].shape == (2, 77)
    cidx = data_lib.sample_indices(3, step=step, seed=c.seed, batch_size=2, stream=1)
    np.testing.assert_array_equal(b['class_ids'], sd.tokenize([captions[i] for i in cidx]))
    words = [scale_augment.PREFIXES[p] for p in latents.instance_prompt_id[b['instance_index']]]
    np.testing.assert_array_equal(
        b['instance_ids'], sd.tokenize([w + data_lib.resolve_prompts(c)[0] for w in words]))
  (tmp_path / 'caption.txt').write_text('one\n')
  with pytest.raises(ValueError, match='images.txt has 3 lines and caption.txt 1'):
    scale_augment.read_captioned_dir(str(tmp_path), 64, center_crop=True, seed=0)


PEFT_METHODS = ('custom_diffusion', 'custom_diffusion_dpg', 'custom_diffusion_dpg_dino', 'lora',
                'lora_dpg')


def test_evaluation_driver_knows_the_methods(tmp_path):
  """Every Custom Diffusion / LoRA row (SD1.4 and tiny) resolves to a valid training config;
  Custom Diffusion keeps its token as the identifier and gets prompts naming it."""
  import test_evaluation  # pylint: disable=g-import-not-at-top
  from configs import eval_dreambench  # pylint: disable=g-import-not-at-top
  from dpg_jax.evaluation import plan  # pylint: disable=g-import-not-at-top
  config = eval_dreambench.get_config()
  spec = test_evaluation._subject_spec(tmp_path)  # pylint: disable=protected-access
  for name in PEFT_METHODS + tuple(f'tiny_{m}' for m in PEFT_METHODS):
    cfg = plan.training_config(config, name, spec, str(tmp_path))
    train.validate_config(cfg)
    method = 'lora' if 'lora' in name else 'custom_diffusion'
    assert cfg.finetune.method == method
    assert cfg.data.identifier == ('<new1>' if method == 'custom_diffusion' else 'sks')
    assert cfg.dpg.enabled == ('dpg' in name)
  assert plan.with_identifier('a sks toy near sksx', 'sks', '<new1>') == (
      'a <new1> toy near sksx')

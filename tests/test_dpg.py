"""Tests of the DPG objective (dpg_jax/dpg.py) through the real train step.

What DPG hinges on, asserted with numbers:
  * gradient routing: the instance half of the batch reaches the UNet only
    through the critic (a zero critic gives an exactly zero gradient), prior
    preservation adds exactly the gradient of the prior MSE, and the critic
    update reads only detached quantities of the pre-update UNet;
  * the loop: the authors' faithful critic stops cleanly (no NaN checkpoint,
    a hint to the robust preset), the robust one stays finite, a host reward
    trains its critic, and a resumed DPG run equals an uninterrupted one
    (critic state included).
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny_dpg
from dpg_jax import checkpoint as ckpt_lib
from dpg_jax import critic as critic_lib
from dpg_jax import diffusion
from dpg_jax import dpg as dpg_lib
from dpg_jax import rewards as rewards_lib
from dpg_jax import train
from dpg_jax import writers

_BATCH = 1        # instance examples per step (plus as many class examples)
_N_IMAGES = 3     # instance "photos" (random latents) in the step tests
_SGD_LR = 1e-2    # step size of the gradient-recording optimiser below


# -----------------------------------------------------------------------------
# Helpers.
# -----------------------------------------------------------------------------
def _override(config, overrides):
  """Sets {'a.b': value} entries of a ConfigDict; returns it."""
  for key, value in (overrides or {}).items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _config(overrides=None):
  """configs/tiny_dpg with a frozen text encoder and a batch of one."""
  c = tiny_dpg.get_config()
  c.batch_size = _BATCH
  c.train_text_encoder = False
  c.warmup_steps = 0
  return _override(c, overrides)


def _recording_sgd(lr=_SGD_LR):
  """SGD whose state is the last gradient, bit for bit (for gradient checks)."""
  def init(params):
    return jax.tree.map(jnp.zeros_like, params)

  def update(grads, state, params=None):
    del state, params
    return jax.tree.map(lambda g: -lr * g, grads), grads

  return optax.GradientTransformation(init, update)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _max_abs(tree):
  return max(float(np.abs(x).max()) for x in _leaves(tree))


def _all_finite(tree):
  return all(np.all(np.isfinite(x)) for x in _leaves(tree)
             if np.issubdtype(x.dtype, np.floating))


def _series(rows, key):
  return np.array([r[key] for r in rows], np.float64)


def _first_last_fifth(values):
  n = max(len(values) // 5, 1)
  return float(values[:n].mean()), float(values[-n:].mean())


def _assert_trees_close(a, b, atol, rtol=0.0):
  """Same leaves at the same paths (static fields such as a critic's apply_fn
  are not compared: separately built states hold distinct function objects)."""
  la, _ = jax.tree_util.tree_flatten_with_path(a)
  lb, _ = jax.tree_util.tree_flatten_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol,
                               err_msg=jax.tree_util.keystr(path))


class _Setup:
  """A DPG train step on the tiny SD, its inputs and a jitted step."""

  def __init__(self, tiny_sd, tmp_path, *, prior: bool, preset: str, overrides=None):
    sd, params = tiny_sd
    config = _config({'prior_preservation': prior,
                      'dpg.critic': critic_lib.critic_config(preset), **(overrides or {})})
    rng = np.random.default_rng(0)
    refs = rng.integers(0, 256, (_N_IMAGES, 64, 64, 3), dtype=np.uint8)
    self.dpg = dpg_lib.DPG.build(config, sd, refs, ['a photo of sks toy'],
                                 workdir=str(tmp_path))
    spec = train.make_step_spec(sd, config, self.dpg)
    self.spec = dataclasses.replace(spec, optimizer=_recording_sgd())
    self.sd, self.params, self.config, self.workdir = sd, params, config, str(tmp_path)
    self.trainable = {'unet': params['unet']}
    self.state = train.init_state(self.spec, self.trainable, jax.random.PRNGKey(0))
    # Conditioning: random text context of the right shape (the encoder is frozen).
    ctx_shape = jax.eval_shape(sd.encode_text, params['text_encoder'],
                               np.zeros((1, sd.max_length), np.int32)).shape
    ctx = rng.standard_normal((2,) + ctx_shape[1:]).astype(np.float32)
    # Raw latent distributions with the spread of real VAE latents (x0 ~ O(1) scaled).
    lat = lambda n: (rng.standard_normal((n, 4, 8, 8)).astype(np.float32) * 4.0,
                     np.full((n, 4, 8, 8), 0.05, np.float32))
    inst_mean, inst_std = lat(_N_IMAGES)
    self.batch = {'instance_mean': inst_mean[:_BATCH], 'instance_std': inst_std[:_BATCH],
                  'instance_index': np.arange(_BATCH, dtype=np.int32),
                  'instance_context': np.repeat(ctx[:1], _BATCH, 0)}
    if prior:
      cls_mean, cls_std = lat(_BATCH)
      self.batch.update(class_mean=cls_mean, class_std=cls_std,
                        class_context=np.repeat(ctx[1:], _BATCH, 0))
    self.rng = jax.random.PRNGKey(1)
    self.frozen = self.dpg.frozen_inputs(params)
    self.step = jax.jit(lambda s, b, r, f: train.train_step(self.spec, s, b, r, f))

  def run(self, state):
    return self.step(state, self.batch, self.rng, self.frozen)

  def with_critic(self, fn):
    """self.state with every critic's params replaced by fn(params)."""
    critic = {k: v.replace(params=jax.tree.map(fn, v.params))
              for k, v in self.state.critic.items()}
    return self.state.replace(critic=critic)

  def noised(self, state):
    """(x0, eps, t, x_t) exactly as train_step draws them (micro-batch 0)."""
    rng = jax.random.fold_in(self.rng, state.step)
    rngs = jax.random.split(rng, self.spec.grad_accum_steps + 1)
    mean, std = self.batch['instance_mean'], self.batch['instance_std']
    if 'class_mean' in self.batch:
      mean = np.concatenate([mean, self.batch['class_mean']])
      std = np.concatenate([std, self.batch['class_std']])
    return diffusion.training_example(rngs[0], mean, std, self.spec.alphas_cumprod,
                                      self.sd.scaling_factor)

  def context(self):
    ctx = self.batch['instance_context']
    if 'class_context' in self.batch:
      ctx = np.concatenate([ctx, self.batch['class_context']])
    return ctx


@pytest.fixture(scope='module')
def no_prior(tiny_sd, tmp_path_factory):
  return _Setup(tiny_sd, tmp_path_factory.mktemp('no_prior'), prior=False, preset='faithful')


@pytest.fixture(scope='module')
def with_prior(tiny_sd, tmp_path_factory):
  return _Setup(tiny_sd, tmp_path_factory.mktemp('with_prior'), prior=True, preset='robust')


# -----------------------------------------------------------------------------
# 1. Eq. 7-8 and Eq. 11 on the DPG code path.
# -----------------------------------------------------------------------------
def test_policy_loss_is_discounted_critic_value_and_eq8_holds(no_prior):
  """policy_loss: x0_hat by Eq. 7, its error by Eq. 8, loss = mean(w gamma^t Q)."""
  s = no_prior
  d = s.dpg
  rng = np.random.default_rng(3)
  shape = (4,) + d.latent_shape
  x0, eps, eps_hat = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
  t = np.array([0, 10, 500, 999], np.int32)
  a = np.asarray(s.spec.alphas_cumprod)[t].astype(np.float64)
  x_t = (np.sqrt(a)[:, None, None, None] * x0
         + np.sqrt(1 - a)[:, None, None, None] * eps).astype(np.float32)
  critic = s.state.critic
  loss, terms, aux = jax.jit(lambda c, p: d.policy_loss(
      c, s.frozen, pred=p, x0=x0, eps=eps, x_t=x_t, t=t,
      alphas_cumprod=s.spec.alphas_cumprod, prediction_type='epsilon', micro={}))(
          critic, eps_hat)
  # Eq. 7 (x0_hat) and Eq. 8 (its squared error is a rescaled eps error).
  x0_hat = np.asarray(aux['x0_hat'])
  np.testing.assert_allclose(x0_hat, diffusion.predict_x0(x_t, eps_hat, a.astype(np.float32)),
                             rtol=1e-5, atol=1e-5)
  lhs = np.sum(np.square(x0_hat.astype(np.float64) - x0), axis=(1, 2, 3))
  rhs = (1 - a) / a * np.sum(np.square(eps_hat.astype(np.float64) - eps), axis=(1, 2, 3))
  np.testing.assert_allclose(lhs, rhs, rtol=2e-4)
  np.testing.assert_allclose(float(terms['dpg/look_forward_error']),
                             np.mean(lhs) / np.prod(d.latent_shape), rtol=2e-4)
  np.testing.assert_allclose(float(terms['dpg/instance_eps_mse']),
                             np.mean(np.square(eps_hat - eps)), rtol=1e-5)
  # Eq. 11 as the authors' loss: weight * gamma**t * Q((x0 - x0_hat)^2), no MSE term.
  (term,) = d.terms
  q = critic_lib.critic_value(critic[term.name], jnp.square(x0 - x0_hat))
  expected = np.mean(term.weight * np.float64(d.gamma) ** t * np.asarray(q, np.float64))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  assert d.instance_mse_weight == 0.0 and term.discounted and d.gamma == 0.9986


# -----------------------------------------------------------------------------
# 2. Gradient routing through the real train step.
# -----------------------------------------------------------------------------
def test_zero_critic_gives_exactly_zero_unet_gradient(no_prior):
  s = no_prior
  assert not s.spec.prior_preservation and s.dpg.instance_mse_weight == 0.0
  new, m = s.run(s.with_critic(jnp.zeros_like))
  grads = new.opt_state['unet']
  assert _max_abs(grads) == 0.0
  assert float(m['grad_norm']) == 0.0
  assert float(m['dpg/q_look_forward']) == 0.0
  # ... while the instance signal itself is there (the UNet is far from x0).
  assert float(m['dpg/look_forward_error']) > 0.0


def test_nonzero_critic_routes_instance_gradient_to_unet(no_prior):
  s = no_prior
  new, m = s.run(s.state)
  grads = new.opt_state['unet']
  assert float(m['grad_norm']) > 0.0
  # Every UNet layer on the path from the output receives gradient.
  nonzero = np.mean([np.abs(g).max() > 0 for g in _leaves(grads)])
  assert nonzero > 0.9, nonzero
  # The policy update is exactly -lr * grad: nothing else writes the UNet params.
  _assert_trees_close(new.params['unet'],
                      jax.tree.map(lambda p, g: p - _SGD_LR * g, s.state.params['unet'], grads),
                      atol=1e-7, rtol=1e-6)
  # And the gradient is that of Q itself: doubling the critic's last layer doubles it.
  double = lambda path, x: 2 * x if path[0].key == 'fc2' else x
  critic2 = {k: v.replace(params=jax.tree_util.tree_map_with_path(double, v.params))
             for k, v in s.state.critic.items()}
  new2, _ = s.run(s.state.replace(critic=critic2))
  _assert_trees_close(new2.opt_state['unet'], jax.tree.map(lambda g: 2 * g, grads),
                      atol=1e-9, rtol=1e-4)


def test_prior_gradient_alone_when_critic_is_zero(with_prior):
  s = with_prior
  new, m = s.run(s.with_critic(jnp.zeros_like))
  grads = new.opt_state['unet']
  # Reference: d/dtheta prior_loss_weight * MSE(eps_hat_prior, eps_prior), by hand.
  x0, eps, t, x_t = s.noised(s.state)
  ctx = s.context()
  n = _BATCH

  def prior_loss(unet):
    pred = s.sd.predict(unet, x_t, t, ctx)
    return s.config.prior_loss_weight * jnp.mean(jnp.square(pred[n:] - eps[n:]))

  ref_loss, ref = jax.jit(jax.value_and_grad(prior_loss))(s.state.params['unet'])
  assert _max_abs(ref) > 0
  _assert_trees_close(grads, ref, atol=1e-6 * _max_abs(ref), rtol=1e-4)
  np.testing.assert_allclose(float(m['prior_loss']), float(ref_loss), rtol=1e-5)


def _critic_by_hand(s, unet_params, state):
  """Eq. 4 applied with critic.critic_update to the step's detached inputs/targets."""
  x0, eps, t, x_t = s.noised(state)
  n = _BATCH
  pred = s.sd.predict(unet_params, x_t, t, s.context())[:n]
  abar = jnp.asarray(s.spec.alphas_cumprod)[t[:n]]
  x0_hat = diffusion.predict_x0(x_t[:n], pred, abar)
  inputs = jnp.square(x0[:n] - x0_hat)
  target = jnp.mean(inputs.reshape(n, -1), axis=-1)     # the look-forward cost
  new, _ = critic_lib.critic_update(state.critic['look_forward'], inputs, target)
  return new


def test_critic_update_reads_only_the_pre_update_forward(no_prior):
  s = no_prior
  new, m = s.run(s.state)
  old_c, new_c = s.state.critic['look_forward'], new.critic['look_forward']
  assert _max_abs(jax.tree.map(jnp.subtract, new_c.params, old_c.params)) > 0
  assert int(new_c.step) == 1
  by_hand = jax.jit(_critic_by_hand, static_argnums=0)
  pre = by_hand(s, s.state.params['unet'], s.state)
  _assert_trees_close(new_c.params, pre.params, atol=1e-6, rtol=1e-6)
  _assert_trees_close(new_c.opt_state, pre.opt_state, atol=1e-6, rtol=1e-6)
  _assert_trees_close(new_c.target_stats, pre.target_stats, atol=1e-6, rtol=1e-6)
  # The policy moved the UNet in the same step; a critic fitted to the moved
  # UNet would differ, so the equality above is not vacuous.
  assert _max_abs(jax.tree.map(jnp.subtract, new.params['unet'], s.state.params['unet'])) > 0
  post = by_hand(s, new.params['unet'], s.state)
  diff = _max_abs(jax.tree.map(jnp.subtract, post.params, new_c.params))
  assert diff > 1e-5, diff
  np.testing.assert_allclose(float(m['dpg/cost_look_forward']),
                             float(m['dpg/look_forward_error']), rtol=1e-6)


@pytest.mark.parametrize('fixture', ['no_prior', 'with_prior'])
def test_nonfinite_critic_update_stops_only_without_skip(fixture, request):
  """dpg/critic_nonfinite (which stops the loop) counts only critics that do not
  skip non-finite updates; the robust critic's skipped update is reported as
  dpg/critic_skipped and leaves its state as it was."""
  s = request.getfixturevalue(fixture)
  skip = s.state.critic['look_forward'].skip_nonfinite
  assert skip == (fixture == 'with_prior')   # faithful vs robust preset
  update = jax.jit(s.dpg.critic_update)
  shape = (_BATCH,) + s.dpg.latent_shape
  for x0_hat, bad in ((np.ones(shape, np.float32), False),
                      (np.full(shape, 1e30, np.float32), True)):   # cost overflows to inf
    auxs = {'x0': np.zeros(shape, np.float32), 'x0_hat': x0_hat,
            'eps': np.zeros(shape, np.float32), 'eps_hat': np.zeros(shape, np.float32),
            't': np.full((_BATCH,), 500, np.int32)}
    new, m = update(s.state.critic, s.frozen, auxs, jax.random.PRNGKey(0))
    assert float(m['critic_look_forward/nonfinite']) == float(bad)
    assert float(m['dpg/critic_nonfinite']) == float(bad and not skip)
    assert float(m['dpg/critic_skipped']) == float(bad and skip)
    changed = _max_abs(jax.tree.map(jnp.subtract, new['look_forward'].params,
                                    s.state.critic['look_forward'].params))
    if bad and skip:
      assert changed == 0.0 and _all_finite(new)
    elif bad:
      assert not _all_finite(new['look_forward'].params)   # the loop must stop
    else:
      assert changed > 0.0 and _all_finite(new)


# -----------------------------------------------------------------------------
# 2b. The embedding critic (dpg.critic.arch='embedding') with the DINO reward.
# -----------------------------------------------------------------------------
_DINO_WEIGHT = 0.5


@pytest.fixture(scope='module')
def dino_embedding(tiny_sd, tmp_path_factory):
  return _Setup(tiny_sd, tmp_path_factory.mktemp('dino_embedding'), prior=False,
                preset='robust', overrides={'dpg.rewards': f'dino:{_DINO_WEIGHT}',
                                            'dpg.critic.arch': 'embedding',
                                            'dpg.critic.input': 'auto'})


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_embedding_critic_policy_loss_is_weighted_cosine_cost(dino_embedding):
  """policy_loss = lambda * mean(1 - cos(e_hat(x0_hat), reference)), the DINO
  cost with the critic's embedding in place of DINO's."""
  s = dino_embedding
  d = s.dpg
  (term,) = d.terms
  assert term.name == 'dino' and not term.discounted and d.instance_mse_weight == 0.0
  assert d.inputs['dino'] == 'x0_hat'
  state = s.state.critic['dino']
  ref = np.asarray(s.frozen['rewards']['dino']['reference'])
  assert state.kind == 'embedding' and state.params['fc2']['kernel'].shape[-1] == ref.shape[-1]
  rng = np.random.default_rng(3)
  shape = (3,) + d.latent_shape
  x0, eps, eps_hat = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
  t = np.array([10, 500, 999], np.int32)
  a = np.asarray(s.spec.alphas_cumprod)[t][:, None, None, None]
  x_t = (np.sqrt(a) * x0 + np.sqrt(1 - a) * eps).astype(np.float32)
  loss, terms, aux = jax.jit(lambda c, p: d.policy_loss(
      c, s.frozen, pred=p, x0=x0, eps=eps, x_t=x_t, t=t,
      alphas_cumprod=s.spec.alphas_cumprod, prediction_type='epsilon', micro={}))(
          s.state.critic, eps_hat)
  e_hat = np.asarray(state.apply_fn({'params': state.params}, aux['x0_hat']), np.float64)
  np.testing.assert_allclose(np.linalg.norm(e_hat, axis=-1), 1.0, rtol=1e-5)
  cost = 1.0 - e_hat @ _unit(ref)
  assert cost.min() > 1e-3   # an untrained critic: far from the reference
  np.testing.assert_allclose(float(loss), _DINO_WEIGHT * cost.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(terms['dpg/q_dino']), cost.mean(), rtol=1e-5)


def test_embedding_critic_train_step_and_checkpoint_round_trip(dino_embedding, tmp_path):
  """One train step: the UNet moves (through the critic), the critic takes one
  step towards DINO's unit embedding of D(x0_hat) of the pre-update UNet, and the
  new state (critic included) survives a checkpoint save/restore bit for bit."""
  from dpg_jax import encoders  # pylint: disable=g-import-not-at-top
  s = dino_embedding
  new, m = s.run(s.state)
  assert float(m['grad_norm']) > 0 and _all_finite(new)
  assert _max_abs(jax.tree.map(jnp.subtract, new.params['unet'], s.state.params['unet'])) > 0
  assert 0.0 <= float(m['dpg/cost_dino']) <= 2.0
  np.testing.assert_allclose(float(m['critic_dino/cosine']), 1 - float(m['critic_dino/loss']) / 2,
                             rtol=1e-6)
  # The critic's target by hand: the reward encoder's unit embedding.
  enc, enc_params = encoders.load_dino(os.path.join(s.workdir, 'pretrained_tiny_encoders', 'dino'))

  @jax.jit
  def by_hand(unet, vae, enc_params, critic):
    _, _, t, x_t = s.noised(s.state)
    n = _BATCH
    pred = s.sd.predict(unet, x_t, t, s.context())[:n]
    x0_hat = diffusion.predict_x0(x_t[:n], pred, jnp.asarray(s.spec.alphas_cumprod)[t[:n]])
    emb = enc.embed_images(enc_params, s.sd.decode_latents(vae, x0_hat))
    target = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
    return critic_lib.critic_update(critic, x0_hat, target)

  by_hand, hm = by_hand(s.state.params['unet'], s.params['vae'], enc_params,
                        s.state.critic['dino'])
  _assert_trees_close(new.critic['dino'].params, by_hand.params, atol=1e-6, rtol=1e-5)
  np.testing.assert_allclose(float(m['critic_dino/cosine']), float(hm['critic/cosine']),
                             atol=1e-5)
  assert _max_abs(jax.tree.map(jnp.subtract, new.critic['dino'].params,
                               s.state.critic['dino'].params)) > 0
  # Save / restore into the abstract state of the same config.
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'ckpt'), async_save=False)
  try:
    ckpt.save(1, new, {'step': 1})
    target_state = jax.eval_shape(
        lambda p: train.init_state(s.spec, p, jax.random.PRNGKey(0)), s.trainable)
    restored, _ = ckpt.restore(1, target_state)
  finally:
    ckpt.close()
  assert restored.critic['dino'].kind == 'embedding'
  _assert_trees_close(restored, new, atol=0)


def test_embedding_critic_needs_an_embedding_reward():
  for rewards, ok in (('look_forward:1.0', False), ('dino:0.1,look_forward:1.0', False),
                      ('dino:0.1', True), ('clip_image:1,clip_text:1', True)):
    config = _config({'dpg.rewards': rewards, 'dpg.critic.arch': 'embedding'})
    if ok:
      dpg_lib.validate_config(config)
    else:
      with pytest.raises(ValueError, match=r"dpg.critic.arch='embedding' .*'look_forward'"):
        dpg_lib.validate_config(config)
  # A direct DINO term has no critic, so nothing needs an embedding there.
  dpg_lib.validate_config(_config({'dpg.rewards': 'dino:0.1', 'dpg.dino_direct': True,
                                   'dpg.critic.arch': 'embedding'}))


# -----------------------------------------------------------------------------
# 3-5. The training loop (train.train_and_evaluate) with DPG.
# -----------------------------------------------------------------------------
def _loop_config(tiny_sd_dir, preset='robust', overrides=None):
  """tiny_dpg on the session's tiny SD, with every side effect made cheap."""
  c = tiny_dpg.get_config(preset)
  c.model.pretrained, c.model.tiny = tiny_sd_dir, ''
  c.log_every, c.checkpoint_every, c.max_to_keep = 1, 10_000, 100
  c.sample_every, c.export = 0, False
  c.data.num_class_images, c.data.class_sample_steps = 2, 2
  c.sample.batch_size = 2              # class images (prior preservation)
  c.sample.prompts = ()                # no preview images
  c.warmup_steps = 0
  return _override(c, overrides)


def _abstract_state(config, tiny_sd, workdir):
  """Shapes/dtypes of the train state of `config` (restore target)."""
  sd, params = tiny_sd
  refs = np.zeros((1, config.data.resolution, config.data.resolution, 3), np.uint8)
  dpg = dpg_lib.DPG.build(config, sd, refs, ['a photo of sks toy'], workdir=workdir)
  spec = train.make_step_spec(sd, config, dpg)
  trainable = {'unet': params['unet']}
  if config.train_text_encoder:
    trainable['text_encoder'] = params['text_encoder']
  return jax.eval_shape(lambda p: train.init_state(spec, p, jax.random.PRNGKey(0)), trainable)


def _restore_all(workdir, target):
  """{step: restored state} of every checkpoint in <workdir>/checkpoints."""
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), async_save=False)
  try:
    return {s: ckpt.restore(s, target)[0] for s in sorted(ckpt.all_steps())}
  finally:
    ckpt.close()


def test_faithful_critic_diverges_and_stops_cleanly(tiny_sd, tiny_sd_dir, tmp_path):
  """The authors' SGD critic blows up on the random-init model; the loop stops
  with a NonFiniteError naming the robust preset and leaves only finite checkpoints."""
  config = _loop_config(tiny_sd_dir, 'faithful', {
      'num_steps': 12, 'checkpoint_every': 1, 'batch_size': 1,
      'prior_preservation': False, 'train_text_encoder': False})
  workdir = str(tmp_path / 'faithful')
  with pytest.raises(ckpt_lib.NonFiniteError, match='robust preset') as err:
    train.train_and_evaluate(config, workdir)
  assert 'faithful' in str(err.value)
  rows = writers.read_metrics(workdir)
  assert rows, 'diverged before any logged step: the test would check nothing'
  last = rows[-1]['step']
  assert last < config.num_steps
  # Divergence, not a spurious stop: the critic's error exploded before the stop.
  assert max(r['critic_look_forward/loss'] for r in rows) > 1e6
  # No row of a non-finite step was logged (the critic's grad_norm may overflow
  # float32 while every element stays finite, hence only the losses here).
  assert all(np.isfinite([r['loss'], r['critic_look_forward/loss']]).all() for r in rows)
  states = _restore_all(workdir, _abstract_state(config, tiny_sd, workdir))
  assert sorted(states) == list(range(1, last + 1))   # all logged steps; none after
  for step, state in states.items():
    assert int(state.step) == step
    assert _all_finite(state), step


def test_dpg_resume_is_exact_critic_included(tiny_sd, tiny_sd_dir, tmp_path):
  """Stopped at step 2 and resumed to 4 == run to 4 at once, bit for bit: UNet,
  optimiser and the critic's params, optimiser and target statistics (the
  critical path of every preempted DPG run; the slow test below runs longer)."""
  full, resumed = str(tmp_path / 'full'), str(tmp_path / 'resumed')
  train.train_and_evaluate(_loop_config(tiny_sd_dir, 'robust', {
      'num_steps': 4, 'checkpoint_every': 2}), full)
  for n in (2, 4):
    train.train_and_evaluate(_loop_config(tiny_sd_dir, 'robust', {
        'num_steps': n, 'checkpoint_every': 2}), resumed)
  assert [r['step'] for r in writers.read_metrics(resumed)] == [1, 2, 3, 4]
  config = _loop_config(tiny_sd_dir, 'robust')
  target = _abstract_state(config, tiny_sd, full)
  a, b = _restore_all(full, target)[4], _restore_all(resumed, target)[4]
  assert int(b.critic['look_forward'].step) == 4
  assert _max_abs(jax.tree.map(jnp.subtract, a.critic['look_forward'].params,
                               _restore_all(full, target)[2].critic['look_forward'].params)) > 0
  _assert_trees_close(b.critic, a.critic, atol=0)
  _assert_trees_close(b, a, atol=0)


_E2E_STEPS = 120     # the uninterrupted tiny DPG run
_E2E_EVERY = 20      # its checkpoint interval
_RESUME_AT, _RESUME_TO = 20, 40


@pytest.fixture(scope='module')
def tiny_dpg_run(tiny_sd_dir, tmp_path_factory):
  """An uninterrupted configs/tiny_dpg run (robust critic) of _E2E_STEPS steps."""
  config = _loop_config(tiny_sd_dir, 'robust', {
      'num_steps': _E2E_STEPS, 'checkpoint_every': _E2E_EVERY})
  workdir = str(tmp_path_factory.mktemp('tiny_dpg') / 'run')
  state = train.train_and_evaluate(config, workdir)
  return config, workdir, state, writers.read_metrics(workdir)


@pytest.mark.slow
def test_robust_critic_stays_finite_to_the_end(tiny_dpg_run):
  config, _, state, rows = tiny_dpg_run
  assert [r['step'] for r in rows] == list(range(1, config.num_steps + 1))
  for key in ('loss', 'grad_norm', 'critic_look_forward/loss', 'dpg/q_look_forward',
              'dpg/look_forward_error'):
    assert np.all(np.isfinite(_series(rows, key))), key
  assert np.all(_series(rows, 'dpg/critic_nonfinite') == 0)
  assert np.all(_series(rows, 'dpg/critic_skipped') == 0)
  assert int(state.step) == config.num_steps
  assert _all_finite(state)


@pytest.mark.slow
def test_tiny_dpg_run_learns_and_resumes_exactly(tiny_dpg_run, tiny_sd, tmp_path):
  config, workdir, state, rows = tiny_dpg_run
  # The critic learns its target and the policy the instance: both errors fall.
  for key in ('critic_look_forward/loss', 'dpg/look_forward_error'):
    first, last = _first_last_fifth(_series(rows, key))
    print(f'{key}: first 20% {first:.4g}, last 20% {last:.4g}')
    assert last < first, (key, first, last)
  # In reward units too: the critic's relative error on each new batch (its
  # prediction before that batch's update) shrinks (measured ~4.9 -> ~0.2).
  pred, cost = _series(rows, 'dpg/critic_pred_look_forward'), _series(rows, 'dpg/cost_look_forward')
  first, last = _first_last_fifth(np.abs(pred - cost) / cost)
  print(f'critic relative error: first 20% {first:.4g}, last 20% {last:.4g}')
  assert last < 0.5 * first, (first, last)
  # Every checkpoint restores, finite, at its step.
  target = _abstract_state(config, tiny_sd, workdir)
  states = _restore_all(workdir, target)
  assert sorted(states) == list(range(_E2E_EVERY, _E2E_STEPS + 1, _E2E_EVERY))
  for step, st in states.items():
    assert int(st.step) == step and _all_finite(st)
  _assert_trees_close(states[_E2E_STEPS], state, atol=0)
  # Kill after _RESUME_AT (a run of that many steps), resume to _RESUME_TO in
  # the same workdir: equal, critic and optimiser states included, to the
  # uninterrupted run at _RESUME_TO (a constant lr schedule makes the length
  # of the run irrelevant to its first steps).
  assert config.lr_schedule == 'constant'
  resumed = str(tmp_path / 'resumed')
  for n in (_RESUME_AT, _RESUME_TO):
    train.train_and_evaluate(_loop_config(config.model.pretrained, 'robust', {
        'num_steps': n, 'checkpoint_every': _E2E_EVERY}), resumed)
  rows_resumed = writers.read_metrics(resumed)
  assert [r['step'] for r in rows_resumed] == list(range(1, _RESUME_TO + 1))
  final = _restore_all(resumed, target)
  assert sorted(final) == [_RESUME_AT, _RESUME_TO]
  reference = states[_RESUME_TO]
  _assert_trees_close(final[_RESUME_TO].critic, reference.critic, atol=1e-6)
  _assert_trees_close(final[_RESUME_TO], reference, atol=1e-6)
  # Logged metrics of the resumed steps match too.
  for r, ref in zip(rows_resumed[_RESUME_AT:], rows[_RESUME_AT:_RESUME_TO]):
    np.testing.assert_allclose(r['critic_look_forward/loss'], ref['critic_look_forward/loss'],
                               rtol=1e-5)


@pytest.mark.slow
def test_host_reward_trains_its_critic_end_to_end(tiny_sd_dir, tmp_path):
  """A numpy (non-differentiable) reward, evaluated on the host from inside the
  jitted step, becomes the target of its critic, which learns it."""
  calls = []

  def brightness(images, prompts):
    assert images.dtype == np.uint8 and images.shape[1:] == (64, 64, 3), images.shape
    out = images.astype(np.float64).mean(axis=(1, 2, 3)) / 255.0
    calls.append((list(prompts), out))
    return out.astype(np.float32)

  rewards_lib.register_host_reward('test_brightness', brightness, overwrite=True)
  # Adam 1e-2: at the robust preset's 1e-4 a fresh critic does not fit a new
  # reward within a few dozen steps (measured: loss 0.83 -> 0.91 in 60 steps).
  config = _loop_config(tiny_sd_dir, 'robust', {
      'num_steps': 40, 'batch_size': 1, 'prior_preservation': False,
      'train_text_encoder': False, 'dpg.rewards': 'test_brightness:1.0',
      'dpg.critic.learning_rate': 1e-2})
  workdir = str(tmp_path / 'host')
  try:
    state = train.train_and_evaluate(config, workdir)
  finally:
    rewards_lib.REWARDS.pop('test_brightness', None)   # the registry is global
  rows = writers.read_metrics(workdir)
  assert len(rows) == config.num_steps
  # One host evaluation per step, on the decoded x0_hat, with the instance prompt.
  assert len(calls) == config.num_steps
  assert all(p == ['a photo of sks toy'] for p, _ in calls)
  # The logged cost is the host value with the reward's sign (higher is better).
  cost = _series(rows, 'dpg/cost_test_brightness')
  np.testing.assert_allclose(cost, [-v.mean() for _, v in calls], rtol=1e-6)
  assert np.all((cost < 0) & (cost > -1))
  loss = _series(rows, 'critic_test_brightness/loss')
  assert np.all(np.isfinite(loss)) and _all_finite(state)
  first, last = _first_last_fifth(loss)
  print(f'critic_test_brightness/loss: first 20% {first:.4g}, last 20% {last:.4g}')
  assert last < 0.5 * first, (first, last)
  # Its predictions (in reward units) approach the target.
  pred = _series(rows, 'dpg/critic_pred_test_brightness')
  err = np.abs(pred - cost) / np.abs(cost)
  assert np.median(err[-8:]) < np.median(err[:8]), err


@pytest.mark.slow
def test_embedding_critic_run_resumes_exactly(tiny_sd, tiny_sd_dir, tmp_path):
  """A DINO-reward run with the embedding critic through the training loop:
  stopped at step 2 and resumed to 4 == run to 4 at once, critic included."""
  overrides = {'num_steps': 4, 'checkpoint_every': 2, 'dpg.rewards': 'dino:0.5',
               'dpg.instance_mse_weight': 1.0, 'dpg.critic.arch': 'embedding'}
  full, resumed = str(tmp_path / 'full'), str(tmp_path / 'resumed')
  train.train_and_evaluate(_loop_config(tiny_sd_dir, 'robust', overrides), full)
  for n in (2, 4):
    train.train_and_evaluate(_loop_config(tiny_sd_dir, 'robust', {**overrides, 'num_steps': n}),
                             resumed)
  rows = writers.read_metrics(resumed)
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  assert all(np.isfinite(r['critic_dino/cosine']) for r in rows)
  config = _loop_config(tiny_sd_dir, 'robust', overrides)
  target = _abstract_state(config, tiny_sd, full)
  a, b = _restore_all(full, target)[4], _restore_all(resumed, target)[4]
  assert a.critic['dino'].kind == 'embedding' and int(b.critic['dino'].step) == 4
  _assert_trees_close(b, a, atol=0)

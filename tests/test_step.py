"""The jitted train step's micro-batch accumulation: forms agree, no loop where none is needed.

On XLA:CPU a backward convolution inside any loop construct (scan, while) runs
as a slow generic loop (the SD1.4-shape step was ~11x slower with a length-1
scan), so the step must contain no loop for one micro-batch, nor for the
unrolled accumulation counts, and all forms must compute the same update.
"""
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny_dpg
from dpg_jax import data as data_lib
from dpg_jax import dpg as dpg_lib
from dpg_jax import train


def _recording_sgd(lr=1e-2):
  def update(grads, state, params=None):
    del state, params
    return jax.tree.map(lambda g: -lr * g, grads), grads
  return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p), update)


def _config(k, unroll, **overrides):
  c = tiny_dpg.get_config('robust')
  c.batch_size = 2
  c.grad_accum_steps = k
  c.grad_accum_unroll = unroll
  c.train_text_encoder = False
  c.warmup_steps = 0
  for key, value in overrides.items():
    c[key] = value
  return c


class _Step:
  """A DPG step (look-forward critic) on the tiny SD with prior preservation."""

  def __init__(self, tiny_sd, workdir, config):
    sd, params = tiny_sd
    rs = np.random.RandomState(0)
    refs = rs.randint(0, 256, (3, 64, 64, 3)).astype(np.uint8)
    dpg = dpg_lib.DPG.build(config, sd, refs, ['a photo of sks toy'], workdir)
    # SGD whose state is the last gradient: grads compare directly (Adam's first
    # step, lr * sign(g), would turn rounding noise of near-zero grads into lr).
    self.spec = dataclasses.replace(train.make_step_spec(sd, config, dpg),
                                    optimizer=_recording_sgd())
    self.state = train.init_state(self.spec, train.trainable_params(params, config),
                                  jax.random.PRNGKey(0))
    h = config.data.resolution // sd.vae_scale
    lat = lambda n: rs.randn(n, 4, h, h).astype(np.float32) * 4.0
    latents = data_lib.SubjectLatents(lat(5), np.full((5, 4, h, h), .05, np.float32),
                                      lat(7), np.full((7, 4, h, h), .05, np.float32))
    cond = train.conditioning_rows(sd, params['text_encoder'], config,
                                   sd.tokenize(['a photo of sks toy', 'a photo of toy']))
    self.batch = train.host_batch(latents, cond, step=3, config=config)
    self.frozen = dpg.frozen_inputs(params)
    self.rng = jax.random.PRNGKey(5)
    self.fn = functools.partial(train.train_step, self.spec)

  def run(self):
    return jax.jit(self.fn)(self.state, self.batch, self.rng, self.frozen)

  def hlo(self) -> str:
    return jax.jit(self.fn).lower(self.state, self.batch, self.rng, self.frozen).as_text()


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize('k', [1, 2])
def test_unrolled_step_equals_scanned_step(tiny_sd, tmp_path, k):
  plain = _Step(tiny_sd, str(tmp_path), _config(k, unroll=8))
  scanned = _Step(tiny_sd, str(tmp_path), _config(k, unroll=0))
  (s1, m1), (s2, m2) = plain.run(), scanned.run()
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(s1.opt_state))
  assert _max_diff(s1.opt_state, s2.opt_state) < 1e-6 * scale    # the gradients
  assert _max_diff(s1.params, s2.params) < 1e-6
  assert _max_diff(s1.critic, s2.critic) < 1e-6
  for name in ('loss', 'prior_loss', 'grad_norm', 'dpg/critic_pred_look_forward',
               'dpg/cost_look_forward', 'critic_look_forward/loss'):
    np.testing.assert_allclose(float(m1[name]), float(m2[name]), rtol=1e-5, err_msg=name)
  # The update is not trivially zero (the comparison above would be vacuous).
  assert _max_diff(s1.params, plain.state.params) > 1e-6


def test_accumulated_grads_are_the_mean_over_strided_micro_batches(tiny_sd, tmp_path):
  k = 2
  s = _Step(tiny_sd, str(tmp_path), _config(k, unroll=8))
  new, metrics = s.run()
  rngs = jax.random.split(jax.random.fold_in(s.rng, s.state.step), k + 1)
  grads_of = jax.jit(functools.partial(train._micro_grads, s.spec))  # pylint: disable=protected-access
  outs = [grads_of(s.state.params, s.state.critic, s.frozen, train.micro_batch(s.batch, k, i),
                   rngs[i]) for i in range(k)]
  # Micro-batch i holds rows i, i+k, ...: every row of the batch exactly once.
  idx = [np.asarray(train.micro_batch(s.batch, k, i)['instance_index']) for i in range(k)]
  np.testing.assert_array_equal(np.sort(np.concatenate(idx)), np.sort(s.batch['instance_index']))
  np.testing.assert_array_equal(idx[1], s.batch['instance_index'][1::2])
  grads = jax.tree.map(lambda a, b: (a + b) / k, outs[0][3], outs[1][3])
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
  assert _max_diff(new.opt_state, grads) < 1e-6 * scale
  np.testing.assert_allclose(float(metrics['loss']), float((outs[0][0] + outs[1][0]) / k),
                             rtol=1e-5)


def _region(text, start):
  """The brace-delimited region that opens at or after `start`: (body, end)."""
  i = text.index('{', start)
  depth = 0
  for j in range(i, len(text)):
    depth += {'{': 1, '}': -1}.get(text[j], 0)
    if depth == 0:
      return text[i:j + 1], j + 1
  raise ValueError('unbalanced braces')


def _convolutions_inside_loops(hlo: str) -> int:
  """Convolutions in the bodies of stablehlo.while ops (called functions followed)."""
  funcs = {m.group(1): _region(hlo, m.end())[0]
           for m in re.finditer(r'func\.func (?:public |private )?@([\w.$-]+)', hlo)}

  def convs(text, seen):
    n = text.count('stablehlo.convolution')
    for name in set(re.findall(r'call @([\w.$-]+)', text)) - seen:
      n += convs(funcs.get(name, ''), seen | {name})
    return n

  total = 0
  for m in re.finditer(r'stablehlo\.while', hlo):
    cond, end = _region(hlo, m.end())
    body, _ = _region(hlo, end)
    total += convs(cond + body, set())
  return total


@pytest.mark.parametrize('k,unroll,loops', [(1, 8, False), (3, 8, False), (1, 0, True),
                                            (3, 2, True)])
def test_the_step_contains_a_loop_only_when_asked(tiny_sd, tmp_path, k, unroll, loops):
  """The regression guard: a loop around the micro-batch costs ~11x on XLA:CPU."""
  hlo = _Step(tiny_sd, str(tmp_path), _config(k, unroll=unroll)).hlo()
  # (jax.random's threefry runs as a small while loop on CPU: only loops
  # around convolutions matter.)
  assert (_convolutions_inside_loops(hlo) > 0) == loops


def test_conditioning_rows_follow_the_text_encoder_setting(tiny_sd):
  sd, params = tiny_sd
  ids = sd.tokenize(['a photo of sks toy', 'a photo of toy'])
  c = _config(2, 8)
  c.train_text_encoder = True
  rows = train.conditioning_rows(sd, params['text_encoder'], c, ids)
  assert sorted(rows) == ['class_ids', 'instance_ids']
  np.testing.assert_array_equal(rows['instance_ids'], np.repeat(ids[:1], 4, 0))
  c.train_text_encoder, c.prior_preservation = False, False
  rows = train.conditioning_rows(sd, params['text_encoder'], c, ids)
  assert sorted(rows) == ['instance_context']
  want = np.asarray(sd.encode_text(params['text_encoder'], ids[:1]))
  np.testing.assert_allclose(rows['instance_context'], np.repeat(want, 4, 0), atol=1e-6)


@pytest.mark.slow
def test_bf16_compute_tracks_fp32_over_a_tiny_run(tiny_sd_dir):
  """bf16 compute with fp32 master weights: the same loss curve as fp32, within noise."""
  from dpg_jax import models  # pylint: disable=g-import-not-at-top
  steps, curves = 200, {}
  for dtype in ('float32', 'bfloat16'):
    sd, params = models.load_stable_diffusion(tiny_sd_dir, dtype=dtype)
    c = _config(1, 8)
    c.dpg.enabled, c.learning_rate = False, 3e-4
    spec = train.make_step_spec(sd, c)
    state = train.init_state(spec, train.trainable_params(params, c), jax.random.PRNGKey(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    rs = np.random.RandomState(0)
    lat = lambda n: rs.randn(n, 4, 8, 8).astype(np.float32) * 4.0
    latents = data_lib.SubjectLatents(lat(4), np.full((4, 4, 8, 8), .05, np.float32),
                                      lat(4), np.full((4, 4, 8, 8), .05, np.float32))
    cond = train.conditioning_rows(sd, params['text_encoder'], c,
                                   sd.tokenize(['a photo of sks toy', 'a photo of toy']))
    step = jax.jit(functools.partial(train.train_step, spec), donate_argnums=0)
    losses = []
    for i in range(steps):
      state, m = step(state, train.host_batch(latents, cond, step=i, config=c),
                      jax.random.PRNGKey(1))
      losses.append(float(m['loss']))
    curves[dtype] = np.asarray(losses)
  f32, b16 = curves['float32'], curves['bfloat16']
  assert np.all(np.isfinite(b16))
  tail = slice(steps - 50, steps)
  assert f32[tail].mean() < 0.7 * f32[:20].mean()           # it learns at all
  np.testing.assert_allclose(b16[tail].mean(), f32[tail].mean(), rtol=0.1)
  np.testing.assert_allclose(b16[:20].mean(), f32[:20].mean(), rtol=0.05)

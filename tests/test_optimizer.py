"""The policy optimiser: the fused AdamW equals optax's transforms, bf16 moments, schedules."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dpg_jax import optimizer


def _config(**kw):
  c = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, lr_schedule='cosine', warmup_steps=2, num_steps=10, adam_b1=0.9,
      adam_b2=0.999, adam_eps=1e-8, weight_decay=1e-2, max_grad_norm=1.0,
      optimizer_state_dtype='float32'))
  c.update(kw)
  return c


def _run(tx, steps=6):
  rs = np.random.RandomState(0)
  params = {'w': jnp.asarray(rs.randn(8, 4), jnp.float32), 'b': jnp.asarray(rs.randn(4))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i in range(steps):
    # Large gradients early (the clip is active), small later (it is not).
    g = jax.tree.map(lambda p, i=i: jnp.asarray(rs.randn(*p.shape), jnp.float32)
                     * (10.0 if i < 3 else 0.01), params)
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize('max_grad_norm', [1.0, 0.0])
def test_fused_update_equals_optax_transforms(max_grad_norm):
  opt = optimizer.make_optimizer(_config(max_grad_norm=max_grad_norm))
  (p1, s1), (p2, s2) = _run(opt.tx), _run(opt.reference)
  assert jax.tree.structure(s1) == jax.tree.structure(s2)   # checkpoints restore alike
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p2, s2))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-7)


def test_reference_is_optax_adamw_with_clipping():
  c = _config()
  lr = optimizer.make_lr_schedule(c)
  want = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2))
  (p1, _), (p2, _) = _run(optimizer.make_optimizer(c).tx), _run(want)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=1e-7)


def test_bf16_moments_are_stored_in_bf16_and_track_fp32():
  p32, _ = _run(optimizer.make_optimizer(_config()).tx)
  p16, s16 = _run(optimizer.make_optimizer(_config(optimizer_state_dtype='bfloat16')).tx)
  adam = s16[1][0]
  assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}
  # bf16 rounds the moments to 8 significant bits: the step sizes stay within ~1 %.
  moved32 = jax.tree.map(lambda a, b: a - b, p32, _run(optimizer.make_optimizer(
      _config()).tx, steps=0)[0])
  moved16 = jax.tree.map(lambda a, b: a - b, p16, _run(optimizer.make_optimizer(
      _config()).tx, steps=0)[0])
  for a, b in zip(jax.tree.leaves(moved16), jax.tree.leaves(moved32)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0.05, atol=2e-5)


def test_schedule_and_bad_values():
  lr = optimizer.make_lr_schedule(_config())
  np.testing.assert_allclose([lr(0), lr(1), lr(2)], [0.0, 5e-4, 1e-3], rtol=1e-6)
  assert float(lr(10)) == pytest.approx(0.0, abs=1e-9)
  with pytest.raises(ValueError, match='config key learning_rate'):
    optimizer.make_lr_schedule(_config(learning_rate=float('nan')))
  with pytest.raises(ValueError, match='config key lr_schedule'):
    optimizer.make_lr_schedule(_config(lr_schedule='step'))
  with pytest.raises(ValueError, match='config key optimizer_state_dtype'):
    optimizer.make_optimizer(_config(optimizer_state_dtype='float16'))

"""Tests of dpg_jax.diffusion: the forward process, targets and Eq. 7-8."""
import jax
import numpy as np
import pytest

from dpg_jax import diffusion
from dpg_jax import rewards


def _abar():
  """SD's scaled_linear abar_t (beta 0.00085 -> 0.012, T = 1000)."""
  betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
  return np.cumprod(1.0 - betas).astype(np.float32)


def _latents(seed, shape=(4, 4, 8, 8)):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]


def _bcast(v):
  return np.asarray(v, np.float64)[:, None, None, None]


def test_training_example_is_the_forward_process():
  mean, std, _ = _latents(5)
  std = np.abs(std) * 0.1
  abar = _abar()
  rng = jax.random.PRNGKey(4)
  x0, eps, t, x_t = map(np.asarray, diffusion.training_example(rng, mean, std, abar, 0.18215))
  # The same draws by hand, in the documented order (latent, noise, t).
  r_lat, r_eps, r_t = jax.random.split(rng, 3)
  want_x0 = (mean + std * np.asarray(jax.random.normal(r_lat, mean.shape))) * 0.18215
  np.testing.assert_allclose(x0, want_x0, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(eps, np.asarray(jax.random.normal(r_eps, mean.shape)))
  np.testing.assert_array_equal(t, np.asarray(jax.random.randint(r_t, (4,), 0, 1000)))
  a = _bcast(abar[t])
  np.testing.assert_allclose(x_t, np.sqrt(a) * want_x0 + np.sqrt(1 - a) * eps, rtol=1e-5,
                             atol=1e-6)


def test_targets_of_both_parameterisations():
  x0 = np.ones((2, 4, 8, 8), np.float32)
  eps = np.full((2, 4, 8, 8), 2.0, np.float32)
  abar = _abar()[np.array([0, 999])]
  np.testing.assert_array_equal(diffusion.target('epsilon', x0, eps, abar), eps)
  want = np.sqrt(_bcast(abar)) * 2.0 - np.sqrt(1 - _bcast(abar)) * 1.0
  np.testing.assert_allclose(diffusion.target('v_prediction', x0, eps, abar),
                             np.broadcast_to(want, x0.shape), rtol=1e-6)
  with pytest.raises(ValueError, match='prediction_type'):
    diffusion.target('sample', x0, eps, abar)


def test_eq8_identity_look_forward_is_scaled_reconstruction():
  x0, eps, eps_hat = _latents(0)
  t = np.array([0, 10, 500, 999])
  a = _abar()[t]
  x_t = diffusion.add_noise(x0, eps, a)
  x0_hat = diffusion.predict_x0(x_t, eps_hat, a)
  lhs = np.sum(np.square(np.asarray(x0_hat) - x0), axis=(1, 2, 3))
  rhs = (1 - a) / a * np.sum(np.square(eps_hat - eps), axis=(1, 2, 3))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-5)
  batch = rewards.RewardBatch(x0=x0, x0_hat=x0_hat, eps=eps, eps_hat=eps_hat, t=t)
  np.testing.assert_allclose(rewards.look_forward_cost({}, batch),
                             (1 - a) / a * rewards.reconstruction_cost({}, batch), rtol=1e-5)
  np.testing.assert_allclose(rewards.reconstruction_cost({}, batch),
                             np.mean(np.square(eps - eps_hat), axis=(1, 2, 3)), rtol=1e-6)


def test_v_prediction_conversions_recover_eps_and_x0():
  x0, eps, _ = _latents(1)
  a = _abar()[np.array([1, 200, 600, 999])]
  sa, sb = np.sqrt(_bcast(a)), np.sqrt(1 - _bcast(a))
  x_t, v = sa * x0 + sb * eps, sa * eps - sb * x0
  eps_hat, x0_hat = diffusion.eps_and_x0(v, x_t, a, 'v_prediction')
  np.testing.assert_allclose(eps_hat, eps, atol=1e-4)
  np.testing.assert_allclose(x0_hat, x0, atol=1e-4)
  eps_hat, x0_hat = diffusion.eps_and_x0(eps, x_t, a, 'epsilon')
  np.testing.assert_allclose(x0_hat, x0, atol=2e-3)  # /sqrt(abar_999) amplifies rounding
  with pytest.raises(ValueError, match='prediction_type'):
    diffusion.eps_and_x0(eps, x_t, a, 'sample')


def test_discount():
  t = np.array([0, 1, 999])
  np.testing.assert_allclose(diffusion.discount(t, 0.9986), 0.9986 ** t.astype(np.float64),
                             rtol=1e-5)

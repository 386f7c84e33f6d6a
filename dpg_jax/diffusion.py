"""The noise maths of the DDPM forward process, as small pure functions of arrays.

Everything the train step, the DPG objective and the rewards need about
q(x_t | x_0) lives here: drawing a training example (x_0, eps, t, x_t), the
regression target of either parameterisation, and the look-forward
reconstruction x0_hat of Eq. 7. `abar` is alphas_cumprod, indexed by t.
Latents are NCHW; per-example quantities ([B]) broadcast over the rest.
"""
import jax
import jax.numpy as jnp

PREDICTION_TYPES = ('epsilon', 'v_prediction')


def per_example(v, x):
  """[B] (or scalar) -> broadcastable against x of rank >= 1."""
  v = jnp.asarray(v, jnp.float32)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def add_noise(x0, eps, abar_t):
  """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (the forward process)."""
  a = per_example(abar_t, x0)
  return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * eps


def training_example(rng, mean, std, alphas_cumprod, scaling_factor: float):
  """(x_0, eps, t, x_t) for one step: x_0 ~ q(z|image) scaled, t ~ U{0..T-1}.

  mean/std are the VAE posterior of each image ([B, C, h, w]); the latent is
  resampled every step, as diffusers' DreamBooth script does with
  `latent_dist.sample()`.
  """
  r_lat, r_eps, r_t = jax.random.split(rng, 3)
  x0 = (mean + std * jax.random.normal(r_lat, mean.shape)) * scaling_factor
  eps = jax.random.normal(r_eps, x0.shape)
  alphas_cumprod = jnp.asarray(alphas_cumprod)
  t = jax.random.randint(r_t, (x0.shape[0],), 0, alphas_cumprod.shape[0])
  return x0, eps, t, add_noise(x0, eps, alphas_cumprod[t])


def target(prediction_type: str, x0, eps, abar_t):
  """What the UNet regresses: eps, or v = sqrt(abar) eps - sqrt(1 - abar) x_0."""
  if prediction_type == 'epsilon':
    return eps
  if prediction_type == 'v_prediction':
    a = per_example(abar_t, x0)
    return jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * x0
  raise ValueError(f'prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}.')


def predict_x0(x_t, eps_hat, abar_t):
  """Eq. 7: x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)."""
  a = per_example(abar_t, x_t)
  return (x_t - jnp.sqrt(1.0 - a) * eps_hat) / jnp.sqrt(a)


def eps_from_v(x_t, v, abar_t):
  """v-prediction -> eps: eps = sqrt(abar) v + sqrt(1 - abar) x_t."""
  a = per_example(abar_t, x_t)
  return jnp.sqrt(a) * v + jnp.sqrt(1.0 - a) * x_t


def x0_from_v(x_t, v, abar_t):
  """v-prediction -> x0: x0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
  a = per_example(abar_t, x_t)
  return jnp.sqrt(a) * x_t - jnp.sqrt(1.0 - a) * v


def eps_and_x0(pred, x_t, abar_t, prediction_type: str = 'epsilon'):
  """(eps_hat, x0_hat) from the UNet output of either parameterisation."""
  if prediction_type == 'epsilon':
    return pred, predict_x0(x_t, pred, abar_t)
  if prediction_type == 'v_prediction':
    return eps_from_v(x_t, pred, abar_t), x0_from_v(x_t, pred, abar_t)
  raise ValueError(f'prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}.')


def discount(t, gamma: float):
  """gamma**t per example [B] (Eq. 9 as the authors apply it)."""
  return jnp.power(jnp.float32(gamma), jnp.asarray(t, jnp.float32))

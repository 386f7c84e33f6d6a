"""The policy's optimiser: AdamW with global-norm clipping and an LR schedule.

Built once per run (`make_optimizer`) and handed down with its schedule, so
the step, validation and the logged `lr` read the same function.

`optimizer_state_dtype='bfloat16'` stores both Adam moments in bf16 (the
update itself is computed in fp32). At SD1.4 size with the text encoder
trained, that halves the 7.9 GB of fp32 moments: the difference between the
paper's recipe fitting in 24 GB of host memory or not. bf16 keeps fp32's
exponent range, so tiny second moments do not underflow; it rounds them to
8 significant bits, which perturbs the per-parameter step size by < 0.4 %.
"""
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ('constant', 'cosine', 'linear')
STATE_DTYPES = ('float32', 'bfloat16')


def make_lr_schedule(config) -> optax.Schedule:
  """The LR as a function of the optimiser step (warm-up, then `lr_schedule`)."""
  lr, warm, total = config.learning_rate, config.warmup_steps, max(config.num_steps, 1)
  if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
    raise ValueError(f'config key learning_rate={lr!r}: expected a finite number > 0.')
  if config.lr_schedule == 'constant':
    main = optax.constant_schedule(lr)
  elif config.lr_schedule == 'cosine':
    main = optax.cosine_decay_schedule(lr, max(total - warm, 1))
  elif config.lr_schedule == 'linear':
    main = optax.linear_schedule(lr, 0.0, max(total - warm, 1))
  else:
    raise ValueError(f'config key lr_schedule={config.lr_schedule!r}: expected one of '
                     f'{SCHEDULES}.')
  if warm > 0:
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])
  return main


def _cast(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype), tree)


def scale_by_adam_in(state_dtype, b1: float, b2: float, eps: float
                     ) -> optax.GradientTransformation:
  """optax.scale_by_adam with both moments stored in `state_dtype`."""
  if jnp.dtype(state_dtype) == jnp.float32:
    return optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=state_dtype)

  def init(params):
    s = inner.init(params)
    return s._replace(nu=_cast(s.nu, state_dtype))

  def update(updates, state, params=None):
    # Moments are widened for the arithmetic and rounded once when stored.
    wide = state._replace(mu=_cast(state.mu, jnp.float32), nu=_cast(state.nu, jnp.float32))
    out, new = inner.update(updates, wide, params)
    return out, new._replace(mu=_cast(new.mu, state_dtype), nu=_cast(new.nu, state_dtype))

  return optax.GradientTransformation(init, update)


def _fused_adamw(reference: optax.GradientTransformation, lr_fn, *, b1, b2, eps,
                 weight_decay, max_grad_norm, state_dtype) -> optax.GradientTransformation:
  """Global-norm clipping + AdamW as ONE elementwise function per leaf.

  The same arithmetic and the same state pytree as `reference` (the optax
  chain clip -> (adam, decayed weights, lr)), so checkpoints of either restore
  alike. Composed from separate optax transforms, XLA:CPU materialises the
  clipped gradients and other per-leaf temporaries all at once: 1.8 GiB of
  extra peak at SD1.4 size. One function per leaf leaves nothing but the
  gradients themselves.
  """
  def update(grads, state, params):
    clip_state, (adam, wd_state, lr_state) = state
    if max_grad_norm:
      norm = optax.tree.norm(grads)
      scale = jnp.where(norm < max_grad_norm, 1.0, max_grad_norm / norm)
    else:
      scale = jnp.ones(())
    count = optax.safe_increment(adam.count)
    bc1 = 1 - b1 ** count.astype(jnp.float32)
    bc2 = 1 - b2 ** count.astype(jnp.float32)
    lr = lr_fn(lr_state.count)

    def leaf(g, m, v, p):
      g = g * scale
      m = b1 * m.astype(jnp.float32) + (1 - b1) * g
      v = b2 * v.astype(jnp.float32) + (1 - b2) * jnp.square(g)
      u = -lr * ((m / bc1) / (jnp.sqrt(v / bc2) + eps) + weight_decay * p)
      return u, m.astype(state_dtype), v.astype(state_dtype)

    out = jax.tree.map(leaf, grads, adam.mu, adam.nu, params)
    first = lambda i: jax.tree.map(lambda _, o: o[i], grads, out)
    new_adam = adam._replace(count=count, mu=first(1), nu=first(2))
    new_lr = lr_state._replace(count=optax.safe_increment(lr_state.count))
    return first(0), (clip_state, (new_adam, wd_state, new_lr))

  return optax.GradientTransformation(reference.init, update)


class Optimizer(NamedTuple):
  tx: optax.GradientTransformation         # what the step runs (fused)
  lr_schedule: optax.Schedule
  reference: optax.GradientTransformation  # the same update from optax's transforms


def make_optimizer(config) -> Optimizer:
  """AdamW with global-norm clipping (the DreamBooth/DPG recipe)."""
  lr_fn = make_lr_schedule(config)
  state_dtype = config.get('optimizer_state_dtype', 'float32')
  if state_dtype not in STATE_DTYPES:
    raise ValueError(f'config key optimizer_state_dtype={state_dtype!r}: expected one of '
                     f'{STATE_DTYPES}.')
  max_norm = config.max_grad_norm if config.max_grad_norm and config.max_grad_norm > 0 else 0.0
  # The reference: optax's own transforms, the same nesting as optax.adamw.
  reference = optax.chain(
      optax.clip_by_global_norm(max_norm) if max_norm else optax.identity(),
      optax.chain(
          scale_by_adam_in(jnp.dtype(state_dtype), config.adam_b1, config.adam_b2,
                           config.adam_eps),
          optax.add_decayed_weights(config.weight_decay),
          optax.scale_by_learning_rate(lr_fn)))
  tx = _fused_adamw(reference, lr_fn, b1=config.adam_b1, b2=config.adam_b2,
                    eps=config.adam_eps, weight_decay=config.weight_decay,
                    max_grad_norm=max_norm, state_dtype=jnp.dtype(state_dtype))
  return Optimizer(tx, lr_fn, reference)

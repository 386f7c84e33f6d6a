"""The DPG critic Q_phi: a small regressor in latent space (Sec. 3.2, Eq. 4).

The critic maps a latent-shaped input (by default the squared residual
(x_0 - x0_hat)^2, NCHW like all latents in dpg_jax) to one scalar per example
and is regressed onto a stop-gradient reward target. The policy then
differentiates Q_phi(input(x0_hat)) with respect to the UNet parameters, so the
reward itself never needs a gradient.

Two presets (`critic_config`):

  * 'faithful': the authors' code. FullyConvRegressionModel with their init
    (see `Critic`), SGD lr 0.01, raw targets. With random-init models at large t
    the residuals reach 1e2-1e3 per element and SGD diverges to inf/NaN within a
    few steps; `critic_update` reports this as `critic/nonfinite`.
  * 'robust': same architecture, Adam lr 1e-4 with global-norm clipping 1.0,
    targets normalised by running statistics ('normalize' below) and non-finite
    updates skipped. Adam's step size does not scale with the gradient, which is
    what keeps it finite on huge inputs.

Target transforms (`cfg.target_transform`):

  * 'none': regress the raw target (the authors' choice).
  * 'normalize': keep a debiased exponential moving mean square of the target
    in the critic state (momentum `norm_momentum`) and regress target / rms.
    Scale only, no centring: a centred target asks the U[0, b]-initialised
    ReLU critic (positive outputs) to go negative, and in tests/test_critic.py's
    regression the centred variant stalled at the constant predictor
    (consistent with its hidden ReLUs switching off). `critic_value` maps
    predictions back to raw units (pred * rms), so policy gradients mean the
    same under both transforms. rms moves slowly and is not corrected for when
    it does (no PopArt).
"""
from typing import Any, Callable

from flax import linen as nn
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

Params = Any

PRESETS = ('faithful', 'robust')
INPUT_KINDS = ('residual', 'x0_hat', 'eps_residual')
TARGET_TRANSFORMS = ('none', 'normalize')


def _uniform(bound: float):
  """U[0, bound]: the authors' init, for kernels and biases alike."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, 0.0, bound)
  return init


class Critic(nn.Module):
  """The authors' FullyConvRegressionModel.

  Conv3x3(C -> 1) -> LeakyReLU(0.01) -> flatten -> Dense(h*w -> hidden) ->
  ReLU -> Dense(hidden -> 1). 262,310 parameters for [B, 4, 64, 64] inputs.
  The flatten ties the parameter count to the latent resolution.

  Init as the authors' `reward_model.py`, weights and biases alike: conv
  U[0, 1/(3*3)] whatever the channel count (their constant is the kernel
  area, not the fan-in 3*3*C), fc1 U[0, 1/(h*w)] (1/4096 at 64x64) and fc2
  U[0, 1/hidden] (1/64). On an all-ones [1, 4, 64, 64] input the expected
  initial Q is 0.511 (tests/test_critic.py derives it).
  """
  hidden: int = 64

  @nn.compact
  def __call__(self, x):
    """x: NCHW [B, C, h, w] -> float32 [B]."""
    x = jnp.transpose(jnp.asarray(x, jnp.float32), (0, 2, 3, 1))
    x = nn.Conv(1, (3, 3), padding='SAME', kernel_init=_uniform(1.0 / (3 * 3)),
                bias_init=_uniform(1.0 / (3 * 3)), name='conv')(x)
    x = nn.leaky_relu(x, 0.01)
    x = x.reshape(x.shape[0], -1)
    bound = 1.0 / x.shape[-1]
    x = nn.Dense(self.hidden, kernel_init=_uniform(bound), bias_init=_uniform(bound),
                 name='fc1')(x)
    x = nn.relu(x)
    x = nn.Dense(1, kernel_init=_uniform(1.0 / self.hidden),
                 bias_init=_uniform(1.0 / self.hidden), name='fc2')(x)
    return x[:, 0]


def symlog(x):
  """sign(x) log(1 + |x|): squashes the 1e-6..1e3 range of residual inputs."""
  return jnp.sign(x) * jnp.log1p(jnp.abs(x))


class PooledCritic(nn.Module):
  """A resolution-independent alternative: convs, GroupNorm, global pooling.

  Inputs are symlog-compressed first (residuals span ~9 decades over t).
  GroupNorm makes the conv features scale-invariant, so per-example mean and
  std of the compressed input bypass it into the head: the target usually
  depends on the input's overall magnitude.
  """
  widths: tuple[int, ...] = (32, 64)
  hidden: int = 64
  groups: int = 8

  @nn.compact
  def __call__(self, x):
    """x: NCHW [B, C, h, w] -> float32 [B]."""
    x = symlog(jnp.transpose(jnp.asarray(x, jnp.float32), (0, 2, 3, 1)))
    stats = jnp.stack([x.mean((1, 2, 3)), x.std((1, 2, 3))], axis=-1)
    h = x
    for i, w in enumerate(self.widths):
      h = nn.Conv(w, (3, 3), strides=1 if i == 0 else 2, padding='SAME')(h)
      h = nn.GroupNorm(num_groups=min(self.groups, w))(h)
      h = nn.silu(h)
    h = jnp.concatenate([h.mean((1, 2)), stats], axis=-1)
    h = nn.silu(nn.Dense(self.hidden)(h))
    return nn.Dense(1)(h)[:, 0]


CRITICS: dict[str, Callable[..., nn.Module]] = {
    'fully_conv': Critic,
    'pooled': PooledCritic,
}


def critic_config(preset: str = 'faithful') -> ml_collections.ConfigDict:
  """All critic fields (for `config.dpg.critic`), filled for a preset."""
  if preset not in PRESETS:
    raise ValueError(f'dpg.critic preset {preset!r}: expected one of {PRESETS}.')
  c = ml_collections.ConfigDict()
  c.arch = 'fully_conv'            # key of critic.CRITICS
  c.hidden = 64
  c.input = 'residual'             # residual | x0_hat | eps_residual (see critic_input)
  c.optimizer = 'sgd'              # sgd | adam
  c.learning_rate = 0.01
  c.max_grad_norm = 0.0            # 0 = no clipping
  c.target_transform = 'none'      # none | normalize
  c.norm_momentum = 0.99           # EMA momentum of the target statistics
  c.skip_nonfinite = False         # keep the old params when loss/grads are not finite
  if preset == 'robust':
    c.optimizer = 'adam'
    c.learning_rate = 1e-4
    c.max_grad_norm = 1.0
    c.target_transform = 'normalize'
    c.skip_nonfinite = True
  return c


def make_critic(cfg) -> nn.Module:
  """The module named by `cfg.arch`."""
  if cfg.arch not in CRITICS:
    raise ValueError(f'dpg.critic.arch={cfg.arch!r} is not registered; '
                     f'known: {sorted(CRITICS)}.')
  kwargs = {'hidden': cfg.hidden} if 'hidden' in cfg else {}
  return CRITICS[cfg.arch](**kwargs)


def critic_input(kind: str, x0, x0_hat, eps=None, eps_hat=None):
  """The critic's input; callers choose where gradients may flow.

  'residual': (x_0 - x0_hat)^2 (the authors'); 'x0_hat': x0_hat itself (for
  rewards of the image, e.g. DINO); 'eps_residual': (eps - eps_hat)^2 (for the
  one-step reconstruction reward).
  """
  if kind == 'residual':
    return jnp.square(x0 - x0_hat)
  if kind == 'x0_hat':
    return x0_hat
  if kind == 'eps_residual':
    if eps is None or eps_hat is None:
      raise ValueError("critic_input('eps_residual') needs eps and eps_hat.")
    return jnp.square(eps - eps_hat)
  raise ValueError(f'dpg.critic.input={kind!r}: expected one of {INPUT_KINDS}.')


def make_critic_optimizer(cfg) -> optax.GradientTransformation:
  """SGD (the authors') or Adam, optionally behind global-norm clipping."""
  if cfg.optimizer == 'sgd':
    tx = optax.sgd(cfg.learning_rate)
  elif cfg.optimizer == 'adam':
    tx = optax.adam(cfg.learning_rate)
  else:
    raise ValueError(f'dpg.critic.optimizer={cfg.optimizer!r}: expected sgd | adam.')
  if cfg.max_grad_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), tx)
  return tx


class TargetStats(struct.PyTreeNode):
  """Exponential moving mean square of the target (not debiased)."""
  sq_mean: jnp.ndarray
  count: jnp.ndarray

  @classmethod
  def create(cls):
    return cls(sq_mean=jnp.zeros((), jnp.float32), count=jnp.zeros((), jnp.int32))

  def update(self, target, momentum: float):
    target = jnp.asarray(target, jnp.float32)
    return self.replace(
        sq_mean=momentum * self.sq_mean + (1 - momentum) * jnp.square(target).mean(),
        count=self.count + 1)

  def scale(self, momentum: float):
    """Debiased root mean square; 1 before the first update."""
    debias = 1.0 - momentum ** self.count.astype(jnp.float32)
    rms = jnp.sqrt(self.sq_mean / jnp.where(self.count > 0, debias, 1.0))
    # The floor only guards an all-zero target; any real cost scale is above it.
    return jnp.where(self.count > 0, jnp.maximum(rms, 1e-12), 1.0)


class CriticState(struct.PyTreeNode):
  """Everything the critic update needs; a pytree (static fields aside)."""
  step: jnp.ndarray
  params: Params
  opt_state: optax.OptState
  target_stats: TargetStats
  apply_fn: Callable = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  target_transform: str = struct.field(pytree_node=False, default='none')
  norm_momentum: float = struct.field(pytree_node=False, default=0.99)
  skip_nonfinite: bool = struct.field(pytree_node=False, default=False)


def create_critic_state(cfg, rng, input_shape) -> CriticState:
  """Initialises module params and optimiser. input_shape: NCHW, e.g. (1, 4, 64, 64)."""
  if cfg.target_transform not in TARGET_TRANSFORMS:
    raise ValueError(f'dpg.critic.target_transform={cfg.target_transform!r}: '
                     f'expected one of {TARGET_TRANSFORMS}.')
  module = make_critic(cfg)
  tx = make_critic_optimizer(cfg)

  @jax.jit
  def init(rng):
    # One compiled init: op-by-op eager init of a Flax module is much slower.
    params = module.init(rng, jnp.zeros(input_shape, jnp.float32))['params']
    return params, tx.init(params)

  params, opt_state = init(rng)
  return CriticState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
      target_stats=TargetStats.create(), apply_fn=module.apply, tx=tx,
      target_transform=cfg.target_transform, norm_momentum=float(cfg.norm_momentum),
      skip_nonfinite=bool(cfg.skip_nonfinite))


def critic_loss(params, apply_fn, inputs, target):
  """Eq. 4: MSE(Q(inputs), target); target is treated as a constant."""
  pred = apply_fn({'params': params}, inputs)
  return jnp.mean(jnp.square(pred - jax.lax.stop_gradient(target)))


def critic_value(state: CriticState, inputs, params=None, normalized: bool = False):
  """Q(inputs) [B] in raw target units (or the regressed units if `normalized`).

  This is what the policy differentiates; pass `inputs` with gradient attached
  to x0_hat. `params` overrides state.params (e.g. the pre-update critic).
  """
  params = state.params if params is None else params
  pred = state.apply_fn({'params': params}, inputs)
  if state.target_transform == 'normalize' and not normalized:
    pred = pred * jax.lax.stop_gradient(state.target_stats.scale(state.norm_momentum))
  return pred


def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def critic_update(state: CriticState, inputs, target):
  """One optimiser step on Eq. 4. Pure; jit it or call it inside a jitted step.

  inputs: critic inputs [B, C, h, w]; target: [B] reward target. Both are
  stop-gradiented here. Returns (new_state, metrics).
  """
  inputs = jax.lax.stop_gradient(jnp.asarray(inputs, jnp.float32))
  target = jax.lax.stop_gradient(jnp.asarray(target, jnp.float32))
  stats = state.target_stats
  regressed, scale = target, jnp.ones((), jnp.float32)
  if state.target_transform == 'normalize':
    stats = stats.update(target, state.norm_momentum)
    scale = stats.scale(state.norm_momentum)
    regressed = target / scale
  loss, grads = jax.value_and_grad(critic_loss)(state.params, state.apply_fn, inputs,
                                                regressed)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(params)
  if state.skip_nonfinite:
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    params = keep(params, state.params)
    opt_state = keep(opt_state, state.opt_state)
    stats = keep(stats, state.target_stats)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            target_stats=stats)
  metrics = {
      'critic/loss': loss,   # in regressed units (raw / target_scale)
      'critic/target_scale': scale,
      'critic/target_mean': target.mean(),
      'critic/grad_norm': optax.tree.norm(grads),
      'critic/nonfinite': (~finite).astype(jnp.float32),
  }
  return new_state, metrics


def num_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))

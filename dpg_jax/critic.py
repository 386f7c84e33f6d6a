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

Init (`cfg.init`, scalar critics): 'authors' (U[0, b], see `Critic`: dQ/dinput
> 0 everywhere at init) or 'zero_mean' (symmetric hidden layers, zero biases,
zero output layer: Q = 0 and no policy gradient before the first critic step).

Embedding critic (`cfg.arch = 'embedding'`, `EmbeddingCritic`): for rewards
1 - cos(embedding, reference) (rewards.EmbeddingCost). It predicts the unit
embedding [B, D] and regresses the reward encoder's (`embedding_loss`); the
policy's cost is 1 - cos(prediction, reference) (dpg.DPG.policy_loss).

Target transforms (`cfg.target_transform`, scalar critics):

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
INITS = ('authors', 'zero_mean')


def _uniform(bound: float, low: float = 0.0):
  """U[low, bound]; low = 0 is the authors' init, for kernels and biases alike."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, low, bound)
  return init


def _torch_default(fan_in: int):
  """PyTorch's default Linear/Conv2d init, kernels and biases alike:
  U[-1/sqrt(fan_in), 1/sqrt(fan_in)] (kaiming_uniform with a = sqrt(5))."""
  bound = 1.0 / float(fan_in) ** 0.5
  return _uniform(bound, -bound)


def _layer_inits(init: str, authors, last: bool):
  """(kernel_init, bias_init) of one layer under dpg.critic.init.

  'authors': `authors` (the pair the authors' code uses for this layer).
  'zero_mean': symmetric kernels (LeCun normal, Flax's default) and zero
  biases, so E[dQ/dinput] = 0 over inits, and a zero output layer (`last`).
  With a zero output layer Q = 0 and dQ/dinput = 0 exactly until the first
  critic step: the policy gets no push from a critic that has seen no reward
  (a random symmetric output layer would still push every latent element,
  only in a random direction). The hidden layers stay random, so the first
  step's gradient on the output layer is non-zero and the rest follows from
  the second step on.
  """
  if init == 'authors':
    return authors
  if init == 'zero_mean':
    if last:
      return nn.initializers.zeros, nn.initializers.zeros
    return nn.initializers.lecun_normal(), nn.initializers.zeros
  raise ValueError(f'dpg.critic.init={init!r}: expected one of {INITS}.')


class Critic(nn.Module):
  """The authors' FullyConvRegressionModel.

  Conv3x3(C -> 1) -> LeakyReLU(0.01) -> flatten -> Dense(h*w -> hidden) ->
  ReLU -> Dense(hidden -> 1). 262,310 parameters for [B, 4, 64, 64] inputs.
  The flatten ties the parameter count to the latent resolution.

  Init as the authors' `reward_model.py`, weights and biases alike: conv
  U[0, 1/(3*3)] whatever the channel count (their constant is the kernel
  area, not the fan-in 3*3*C), fc1 U[0, 1/(h*w)] (1/4096 at 64x64) and fc2
  U[0, 1/hidden] (1/64). On an all-ones [1, 4, 64, 64] input the expected
  initial Q is 0.511 (tests/test_critic.py derives it). Every weight being
  non-negative, dQ/dinput >= 0 everywhere at init: before it has learned
  anything this critic asks the policy to lower every input element.
  init='zero_mean' (`_layer_inits`) starts from Q = 0 with symmetric hidden
  layers instead.
  """
  hidden: int = 64
  weight_init: str = 'authors'

  @nn.compact
  def __call__(self, x):
    """x: NCHW [B, C, h, w] -> float32 [B]."""
    x = jnp.transpose(jnp.asarray(x, jnp.float32), (0, 2, 3, 1))
    k, b = _layer_inits(self.weight_init, (_uniform(1.0 / (3 * 3)),) * 2, last=False)
    x = nn.Conv(1, (3, 3), padding='SAME', kernel_init=k, bias_init=b, name='conv')(x)
    x = nn.leaky_relu(x, 0.01)
    x = x.reshape(x.shape[0], -1)
    k, b = _layer_inits(self.weight_init, (_uniform(1.0 / x.shape[-1]),) * 2, last=False)
    x = nn.Dense(self.hidden, kernel_init=k, bias_init=b, name='fc1')(x)
    x = nn.relu(x)
    k, b = _layer_inits(self.weight_init, (_uniform(1.0 / self.hidden),) * 2, last=True)
    x = nn.Dense(1, kernel_init=k, bias_init=b, name='fc2')(x)
    return x[:, 0]


class EmbeddingCritic(nn.Module):
  """An embedding-regressing critic: the shape of the authors' (unused)
  SimRegressionModel, for rewards 1 - cos(embedding, reference).

  Conv3x3(C -> channels) -> LeakyReLU(0.01) -> flatten -> Dense(hidden) ->
  ReLU -> Dense(dim) -> L2-normalise: a unit vector [B, dim] regressed onto the
  reward encoder's unit embedding of D(x0_hat). The authors' sizes are
  channels 1, hidden 2048 (= 4096 / 2), dim 512; here hidden is a config key
  (dpg.critic.embedding_hidden, 512 by default) and dim the reward encoder's.
  init 'authors' is what their code leaves this model with, PyTorch's default
  (`_torch_default`); 'zero_mean' is Flax's default (LeCun normal, zero
  biases). Both are symmetric, so E[de/dinput] = 0; the output layer is never
  zero (the normalisation needs a non-zero vector).
  """
  dim: int
  hidden: int = 512
  channels: int = 1
  weight_init: str = 'authors'

  @nn.compact
  def __call__(self, x):
    """x: NCHW [B, C, h, w] -> float32 unit vectors [B, dim]."""
    x = jnp.transpose(jnp.asarray(x, jnp.float32), (0, 2, 3, 1))

    def inits(fan_in):
      return _layer_inits(self.weight_init, (_torch_default(fan_in),) * 2, last=False)

    k, b = inits(3 * 3 * x.shape[-1])
    x = nn.Conv(self.channels, (3, 3), padding='SAME', kernel_init=k, bias_init=b,
                name='conv')(x)
    x = nn.leaky_relu(x, 0.01)
    x = x.reshape(x.shape[0], -1)
    k, b = inits(x.shape[-1])
    x = nn.relu(nn.Dense(self.hidden, kernel_init=k, bias_init=b, name='fc1')(x))
    k, b = inits(self.hidden)
    x = nn.Dense(self.dim, kernel_init=k, bias_init=b, name='fc2')(x)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


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
  weight_init: str = 'authors'   # no authors' model: Flax defaults; 'zero_mean' zeroes the output

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
    defaults = (nn.initializers.lecun_normal(), nn.initializers.zeros)
    k, b = _layer_inits(self.weight_init, defaults, last=True)
    return nn.Dense(1, kernel_init=k, bias_init=b)(h)[:, 0]


CRITICS: dict[str, Callable[..., nn.Module]] = {
    'fully_conv': Critic,
    'pooled': PooledCritic,
    'embedding': EmbeddingCritic,
}
# Critics whose output is a unit embedding [B, D], not a scalar Q [B].
EMBEDDING_ARCHS = ('embedding',)


def critic_config(preset: str = 'faithful') -> ml_collections.ConfigDict:
  """All critic fields (for `config.dpg.critic`), filled for a preset."""
  if preset not in PRESETS:
    raise ValueError(f'dpg.critic preset {preset!r}: expected one of {PRESETS}.')
  c = ml_collections.ConfigDict()
  c.arch = 'fully_conv'            # key of critic.CRITICS; 'embedding' for embedding rewards
  c.hidden = 64
  c.init = 'authors'               # authors | zero_mean (see _layer_inits)
  c.embedding_hidden = 512         # EmbeddingCritic's hidden width
  c.embedding_channels = 1         # EmbeddingCritic's conv channels (the authors': 1)
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


def validate_critic_config(cfg) -> None:
  """The checks of dpg.critic that need no model (each error names its key)."""
  if cfg.arch not in CRITICS:
    raise ValueError(f'dpg.critic.arch={cfg.arch!r} is not registered; '
                     f'known: {sorted(CRITICS)}.')
  if cfg.get('init', 'authors') not in INITS:
    raise ValueError(f'dpg.critic.init={cfg.init!r}: expected one of {INITS}.')
  make_critic_optimizer(cfg)
  if cfg.target_transform not in TARGET_TRANSFORMS:
    raise ValueError(f'dpg.critic.target_transform={cfg.target_transform!r}: '
                     f'expected one of {TARGET_TRANSFORMS}.')


def make_critic(cfg, embedding_dim: int = 0) -> nn.Module:
  """The module named by `cfg.arch`; embedding_dim: the reward's D (embedding arch)."""
  validate_critic_config(cfg)
  init = cfg.get('init', 'authors')
  if cfg.arch in EMBEDDING_ARCHS:
    if embedding_dim <= 0:
      raise ValueError(f"dpg.critic.arch={cfg.arch!r} needs the reward encoder's "
                       'embedding size (a reward with an embedding).')
    return CRITICS[cfg.arch](dim=int(embedding_dim), hidden=cfg.embedding_hidden,
                             channels=cfg.embedding_channels, weight_init=init)
  kwargs = {'hidden': cfg.hidden} if 'hidden' in cfg else {}
  return CRITICS[cfg.arch](weight_init=init, **kwargs)


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
  # 'scalar': Q [B] regressed on a cost; 'embedding': a unit embedding [B, D]
  # regressed on the reward encoder's (target_transform does not apply).
  kind: str = struct.field(pytree_node=False, default='scalar')


def create_critic_state(cfg, rng, input_shape, embedding_dim: int = 0) -> CriticState:
  """Initialises module params and optimiser. input_shape: NCHW, e.g. (1, 4, 64, 64).

  embedding_dim: the reward encoder's embedding size, for an embedding arch.
  """
  module = make_critic(cfg, embedding_dim)
  tx = make_critic_optimizer(cfg)
  kind = 'embedding' if cfg.arch in EMBEDDING_ARCHS else 'scalar'

  @jax.jit
  def init(rng):
    # One compiled init: op-by-op eager init of a Flax module is much slower.
    params = module.init(rng, jnp.zeros(input_shape, jnp.float32))['params']
    return params, tx.init(params)

  params, opt_state = init(rng)
  return CriticState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
      target_stats=TargetStats.create(), apply_fn=module.apply, tx=tx,
      target_transform=cfg.target_transform if kind == 'scalar' else 'none',
      norm_momentum=float(cfg.norm_momentum), skip_nonfinite=bool(cfg.skip_nonfinite),
      kind=kind)


def critic_loss(params, apply_fn, inputs, target):
  """Eq. 4: MSE(Q(inputs), target); target is treated as a constant."""
  pred = apply_fn({'params': params}, inputs)
  return jnp.mean(jnp.square(pred - jax.lax.stop_gradient(target)))


def embedding_loss(params, apply_fn, inputs, target):
  """Eq. 4 for an embedding critic: mean_B ||e_hat - e||^2 = mean_B (2 - 2 cos).

  target: the reward encoder's unit embeddings [B, D], a constant.
  """
  pred = apply_fn({'params': params}, inputs)
  return jnp.mean(jnp.sum(jnp.square(pred - jax.lax.stop_gradient(target)), axis=-1))


def critic_embedding(state: CriticState, inputs, params=None):
  """An embedding critic's unit embedding [B, D] of `inputs` (differentiable)."""
  if state.kind != 'embedding':
    raise ValueError('critic_embedding needs an embedding critic (dpg.critic.arch).')
  params = state.params if params is None else params
  return state.apply_fn({'params': params}, inputs)


def critic_value(state: CriticState, inputs, params=None, normalized: bool = False):
  """Q(inputs) [B] in raw target units (or the regressed units if `normalized`).

  This is what the policy differentiates; pass `inputs` with gradient attached
  to x0_hat. `params` overrides state.params (e.g. the pre-update critic).
  Scalar critics only: an embedding critic's value needs the reward's
  reference (dpg.DPG.policy_loss).
  """
  if state.kind != 'scalar':
    raise ValueError('critic_value needs a scalar critic; use critic_embedding.')
  params = state.params if params is None else params
  pred = state.apply_fn({'params': params}, inputs)
  if state.target_transform == 'normalize' and not normalized:
    pred = pred * jax.lax.stop_gradient(state.target_stats.scale(state.norm_momentum))
  return pred


def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def critic_update(state: CriticState, inputs, target):
  """One optimiser step on Eq. 4. Pure; jit it or call it inside a jitted step.

  inputs: critic inputs [B, C, h, w]; target: [B] reward target (a scalar
  critic) or unit embeddings [B, D] (an embedding critic). Both are
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
  loss_fn = embedding_loss if state.kind == 'embedding' else critic_loss
  loss, grads = jax.value_and_grad(loss_fn)(state.params, state.apply_fn, inputs, regressed)
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
  if state.kind == 'embedding':
    metrics['critic/cosine'] = 1.0 - 0.5 * loss   # mean cos(e_hat, e) of unit vectors
    del metrics['critic/target_mean']             # a unit vector's element mean: no meaning
  return new_state, metrics


def num_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))

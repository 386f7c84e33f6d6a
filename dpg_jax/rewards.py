"""DPG rewards: the per-example targets the critics regress (Sec. 3.3-3.4).

Sign convention: every reward here returns a COST, float32 [B], lower is
better. The critic regresses the cost and the policy MINIMISES it, as in the
authors' code (critic target mean((x_0 - x0_hat)^2), policy loss + gamma^t Q).
The paper writes rewards to maximise; its r is -cost:

  reconstruction  cost = mean((eps - eps_hat)^2)                  (Eq. 5)
  look_forward    cost = mean((x0_hat - x_0)^2)                   (Eq. 7-8)
                  policy term weighted by gamma**t                (Eq. 9)
  dino            cost = 1 - cos(DINO(D(x0_hat)), k) in [0, 2]   (Eq. 10, r = -cost)
  clip_image      as dino with CLIP ViT-B/32 image features
  clip_text       cost = 1 - cos(CLIP(D(x0_hat)), CLIP_text(prompt without identifier))
  host rewards    cost = -fn(...) (higher_is_better) or fn(...)

so Eq. 11 as a loss to minimise is
  mean_B( ||eps - eps_hat||^2 + sum_i w_i * gamma_i(t) * Q_i(input_i) ),
with gamma_i(t) = gamma**t for discounted rewards and 1 otherwise (the authors'
look-forward variant drops the MSE term and keeps only the prior loss).
`paper_reward(cost) = -cost` gives the paper's value, e.g. [-2, 0] for dino.

Costs of decoded images are constants for the policy (stop_gradient): the
policy gradient reaches the UNet only through the critic, so the reward needs
no gradient and may be a black box. The one exception is `dino_direct=True`:
the DINO cost is then differentiated through the VAE decoder and DINO and is
meant to be added to the policy loss directly (`BoundReward.direct`).

Lifecycle: `parse_reward_spec(config.dpg.rewards)` -> terms;
`build_rewards(terms, RewardContext(...))` once per run, on the host (loads
encoders, embeds the references and prompts) -> `RewardSet`; its `aux` pytree
is passed into the jitted step (encoder params are arguments, not constants
baked into the program), where `RewardSet.costs(aux, batch)` evaluates every
term on a `RewardBatch`.

Adding a reward computed on the host (numpy in, numpy out, any library):

  def aesthetic(images, prompts):   # uint8 [B, H, W, 3], list[str] of length B
    return np.asarray(my_scorer(images), np.float32)   # [B], higher is better

  rewards.register_host_reward('aesthetic', aesthetic)
  # config: --config.dpg.rewards='look_forward:1.0,aesthetic:0.1'

The function runs inside the jitted step through `jax.pure_callback`: images
are decoded on the device, converted to uint8 there, and copied to the host.
Prompts are looked up by `RewardBatch.prompt_ids` in `RewardContext.prompts`.
A reward that is a jit-able function of the decoded images or latents can
instead be registered with `register(Reward(...))`.

dino, clip_image and clip_text compare an embedding with a reference: they are
registered with `embedding=True` and their cost function is an
`EmbeddingCost`, whose parts the embedding critic (dpg.critic.arch='embedding')
uses through `RewardSet.costs_and_embeddings` and `RewardSet.reference`.
"""
import dataclasses
import functools
import re
from typing import Any, Callable, NamedTuple, Sequence

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from dpg_jax import diffusion

PyTree = Any
SPEC_KEY = 'dpg.rewards'
DEFAULT_GAMMA = 0.9986


def paper_reward(cost):
  """The paper's reward (to maximise) from a cost of this module."""
  return -cost


def _mean_per_example(x):
  return jnp.mean(jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1), axis=-1)


def _l2_normalize(x):
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_cost(emb, ref):
  """1 - cos(emb_i, ref_i) per row, in [0, 2]; ref [D] broadcasts."""
  return 1.0 - jnp.sum(_l2_normalize(emb) * _l2_normalize(ref), axis=-1)


def images_to_uint8(images):
  """NHWC float [-1, 1] -> uint8 [0, 255] on device (rounded, clipped)."""
  return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def strip_identifier(prompt: str, identifier: str) -> str:
  """'a photo of sks dog' -> 'a photo of dog' (the CLIP-T protocol)."""
  if not identifier:
    return prompt
  out = re.sub(rf'(?<!\w){re.escape(identifier)}(?!\w)', ' ', prompt)
  return re.sub(r'\s+', ' ', out).strip()


# -----------------------------------------------------------------------------
# Inputs.
# -----------------------------------------------------------------------------
class RewardBatch(struct.PyTreeNode):
  """What a reward sees, per instance example (arrays [B, ...]).

  images: D(x0_hat) NHWC in [-1, 1], needed only when a term `needs_images`.
  prompt_ids: index into RewardContext.prompts (None = prompt 0).
  ref_ids: index of the reference image x_0 came from (dino per_image mode).
  """
  x0: jnp.ndarray
  x0_hat: jnp.ndarray
  eps: jnp.ndarray | None = None
  eps_hat: jnp.ndarray | None = None
  t: jnp.ndarray | None = None
  images: jnp.ndarray | None = None
  prompt_ids: jnp.ndarray | None = None
  ref_ids: jnp.ndarray | None = None


@dataclasses.dataclass
class RewardContext:
  """Host-side inputs of `build_rewards`, used once per run.

  dino / clip: (encoder, params) from dpg_jax.encoders, or a path / hub id to
  load (config keys dpg.dino_model / dpg.clip_model).
  reference_images: the subject's photos, NHWC uint8 or float [-1, 1].
  prompts: prompt table for `RewardBatch.prompt_ids` (identifier included).
  reference_mode: dino / clip_image compare with 'mean' (the mean of the unit
    reference embeddings) or 'per_image' (the embedding of the reference
    image `RewardBatch.ref_ids`, i.e. the photo x_0 was encoded from).
  dino_direct: differentiate the dino cost through decoder and DINO instead of
    learning it with a critic.
  """
  reference_images: Any = None
  prompts: Sequence[str] = ()
  identifier: str = ''
  dino: Any = None
  clip: Any = None
  reference_mode: str = 'mean'
  dino_direct: bool = False


# -----------------------------------------------------------------------------
# Registry.
# -----------------------------------------------------------------------------
CostFn = Callable[[PyTree, RewardBatch], jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class EmbeddingCost:
  """A cost 1 - cos(embed(batch), reference(batch)) with both parts exposed.

  The cost function of a reward registered with `embedding=True`: calling it
  gives the scalar cost as any CostFn does; the embedding critic
  (dpg.critic.arch='embedding') regresses `embed`'s unit embedding instead and
  compares its own prediction with `reference`.
  embed(aux, batch) -> raw embeddings [B, D] (not normalised);
  reference(aux, batch) -> reference embeddings [B, D] or [D] (broadcast).
  """
  embed: CostFn
  reference: CostFn
  dim: int

  def __call__(self, aux, batch: RewardBatch):
    return cosine_cost(self.embed(aux, batch), self.reference(aux, batch))


@dataclasses.dataclass(frozen=True)
class Reward:
  """A registered reward.

  bind(ctx) -> (cost_fn, aux) runs once per run on the host; cost_fn(aux,
  batch) -> cost [B] is pure and jit-able and may close over static objects
  (modules, prompt tables) but takes arrays (params, embeddings) via aux.
  critic_input: what its critic sees (see critic.critic_input).
  embedding: bind returns an `EmbeddingCost` (the cost compares an embedding
    with a reference), which the embedding critic needs.
  """
  name: str
  bind: Callable[[RewardContext], tuple[CostFn, PyTree]]
  needs_images: bool = False
  critic_input: str = 'residual'
  discounted: bool = False
  embedding: bool = False


REWARDS: dict[str, Reward] = {}


def register(reward: Reward, overwrite: bool = False) -> Reward:
  if reward.name in REWARDS and not overwrite:
    raise ValueError(f'{SPEC_KEY}: a reward named {reward.name!r} is already registered.')
  if not re.fullmatch(r'[A-Za-z_][\w.-]*', reward.name):
    raise ValueError(f'{SPEC_KEY}: reward name {reward.name!r} must be an identifier.')
  REWARDS[reward.name] = reward
  return reward


def _static(fn):
  return lambda ctx: (fn, {})


def reconstruction_cost(aux, batch: RewardBatch):
  del aux
  return _mean_per_example(jnp.square(batch.eps - batch.eps_hat))


def look_forward_cost(aux, batch: RewardBatch):
  del aux
  return _mean_per_example(jnp.square(batch.x0_hat - batch.x0))


register(Reward('reconstruction', _static(reconstruction_cost), critic_input='eps_residual'))
register(Reward('look_forward', _static(look_forward_cost), critic_input='residual',
                discounted=True))


def _encoder(spec, kind: str):
  """(encoder, params) from a tuple or a path; imported lazily (transformers)."""
  if spec is None or spec == '':
    raise ValueError(f'{SPEC_KEY}: the {kind} reward needs a model (config key dpg.{kind}_model).')
  if isinstance(spec, (tuple, list)):
    return spec
  from dpg_jax import encoders  # pylint: disable=g-import-not-at-top
  load = encoders.load_dino if kind == 'dino' else encoders.load_clip
  return load(spec, config_key=f'dpg.{kind}_model')


@functools.partial(jax.jit, static_argnums=0)
def _embed_images(encoder, params, images):
  # One compile per (encoder, shape): binding several rewards reuses it.
  return encoder.embed_images(params, images)


@functools.partial(jax.jit, static_argnums=0)
def _text_features(encoder, params, ids):
  return encoder.text_features(params, ids)


def _reference_embeddings(encoder, params, images, mode: str):
  if images is None or len(images) == 0:
    raise ValueError(f'{SPEC_KEY}: image-similarity rewards need reference images '
                     '(RewardContext.reference_images).')
  if mode not in ('mean', 'per_image'):
    raise ValueError(f'reference_mode={mode!r}: expected mean | per_image.')
  emb = _l2_normalize(_embed_images(encoder, params, jnp.asarray(images)))
  return emb.mean(0) if mode == 'mean' else emb


def _image_similarity(kind: str):
  """dino / clip_image: 1 - cos(embed(D(x0_hat)), reference embedding)."""
  model = 'dino' if kind == 'dino' else 'clip'

  def bind(ctx: RewardContext):
    encoder, params = _encoder(getattr(ctx, model), model)
    mode = ctx.reference_mode
    ref = _reference_embeddings(encoder, params, ctx.reference_images, mode)

    def embed(aux, batch: RewardBatch):
      return encoder.embed_images(aux['params'], batch.images)

    def reference(aux, batch: RewardBatch):
      ref = aux['reference']
      if mode == 'per_image':
        if batch.ref_ids is None:
          raise ValueError(f'{kind} reward with reference_mode=per_image needs '
                           'RewardBatch.ref_ids.')
        ref = ref[batch.ref_ids]
      return ref

    cost = EmbeddingCost(embed, reference, dim=int(ref.shape[-1]))
    return cost, {'params': params, 'reference': ref}

  return bind


def _clip_text_bind(ctx: RewardContext):
  encoder, params = _encoder(ctx.clip, 'clip')
  if not ctx.prompts:
    raise ValueError(f'{SPEC_KEY}: clip_text needs RewardContext.prompts.')
  texts = [strip_identifier(p, ctx.identifier) for p in ctx.prompts]
  text = _l2_normalize(_text_features(encoder, params, encoder.tokenize(texts)))

  def embed(aux, batch: RewardBatch):
    return encoder.embed_images(aux['params'], batch.images)

  def reference(aux, batch: RewardBatch):
    ids = (jnp.zeros((batch.images.shape[0],), jnp.int32) if batch.prompt_ids is None
           else batch.prompt_ids)
    return aux['text'][ids]

  cost = EmbeddingCost(embed, reference, dim=int(text.shape[-1]))
  return cost, {'params': params, 'text': text}


register(Reward('dino', _image_similarity('dino'), needs_images=True, critic_input='x0_hat',
                embedding=True))
register(Reward('clip_image', _image_similarity('clip_image'), needs_images=True,
                critic_input='x0_hat', embedding=True))
register(Reward('clip_text', _clip_text_bind, needs_images=True, critic_input='x0_hat',
                embedding=True))


def host_callback(fn, images, prompt_ids, prompts: Sequence[str]):
  """fn(uint8 images, prompts) -> [B] evaluated on the host from inside jit.

  images: device NHWC float [-1, 1] (no gradient flows back); prompt_ids [B]
  int indices into `prompts`. Returns float32 [B] exactly as fn computed it.
  """
  images = images_to_uint8(jax.lax.stop_gradient(images))
  b = images.shape[0]
  ids = jnp.zeros((b,), jnp.int32) if prompt_ids is None else jnp.asarray(prompt_ids, jnp.int32)
  table = list(prompts) or ['']

  def host(imgs, idx):
    out = np.asarray(fn(np.asarray(imgs), [table[int(i)] for i in np.asarray(idx)]),
                     np.float32)
    if out.shape != (b,):
      raise ValueError(f'host reward {getattr(fn, "__name__", fn)!r} returned shape '
                       f'{out.shape}, expected ({b},).')
    return out

  return jax.pure_callback(host, jax.ShapeDtypeStruct((b,), jnp.float32), images, ids,
                           vmap_method='sequential')


def register_host_reward(name: str, fn: Callable[[np.ndarray, list[str]], np.ndarray], *,
                         higher_is_better: bool = True, overwrite: bool = False) -> Reward:
  """Registers fn(images uint8 [B,H,W,3], prompts list[str]) -> float32 [B].

  higher_is_better: fn returns a reward (its cost is -fn) rather than a cost.
  """
  sign = -1.0 if higher_is_better else 1.0

  def bind(ctx: RewardContext):
    prompts = list(ctx.prompts)

    def cost(aux, batch: RewardBatch):
      del aux
      return sign * host_callback(fn, batch.images, batch.prompt_ids, prompts)

    return cost, {}

  return register(Reward(name, bind, needs_images=True, critic_input='x0_hat'),
                  overwrite=overwrite)


# -----------------------------------------------------------------------------
# Spec parsing and binding.
# -----------------------------------------------------------------------------
class RewardTerm(NamedTuple):
  name: str
  weight: float


def _unknown(name) -> ValueError:
  return ValueError(f'{SPEC_KEY}: unknown reward {name!r}; registered: '
                    f'{", ".join(sorted(REWARDS))}.')


def parse_reward_spec(spec) -> tuple[RewardTerm, ...]:
  """'look_forward:1.0,dino:0.1' | {'look_forward': 1.0} | [(name, w) or 'name:w'].

  A name without a weight gets 1.0. Returns () for an empty spec.
  """
  if spec is None:
    return ()
  if isinstance(spec, str):
    items = [s for s in (x.strip() for x in spec.split(',')) if s]
  elif hasattr(spec, 'items'):   # dict, ConfigDict, FrozenConfigDict
    items = list(spec.items())
  elif isinstance(spec, Sequence):
    items = list(spec)
  else:
    raise ValueError(f'{SPEC_KEY}: expected a string like "look_forward:1.0,dino:0.1", '
                     f'a mapping or a list, got {type(spec).__name__}.')
  terms = []
  for item in items:
    if isinstance(item, str):
      name, _, weight = item.partition(':')
      name, weight = name.strip(), (weight.strip() or '1.0')
    else:
      try:
        name, weight = item
      except (TypeError, ValueError):
        raise ValueError(f'{SPEC_KEY}: cannot read {item!r} as (name, weight).') from None
    if name not in REWARDS:
      raise _unknown(name)
    try:
      weight = float(weight)
    except (TypeError, ValueError):
      raise ValueError(f'{SPEC_KEY}: weight of {name!r} is {weight!r}, not a number.') from None
    if not np.isfinite(weight):
      raise ValueError(f'{SPEC_KEY}: weight of {name!r} must be finite, got {weight}.')
    if any(t.name == name for t in terms):
      raise ValueError(f'{SPEC_KEY}: reward {name!r} is listed twice.')
    terms.append(RewardTerm(name, weight))
  return tuple(terms)


@dataclasses.dataclass(frozen=True)
class BoundReward:
  """A spec term bound to a run: static facts plus its pure cost function."""
  name: str
  weight: float
  fn: CostFn
  needs_images: bool
  critic_input: str
  discounted: bool
  direct: bool = False   # differentiate the cost itself; no critic

  @property
  def embedding(self) -> EmbeddingCost | None:
    """The cost's embedding and reference (rewards registered with embedding=True)."""
    return self.fn if isinstance(self.fn, EmbeddingCost) else None

  def policy_weight(self, t, gamma: float = DEFAULT_GAMMA):
    """weight * gamma**t (discounted) or weight, per example [B]."""
    w = jnp.full(jnp.shape(t), self.weight, jnp.float32)
    return w * diffusion.discount(t, gamma) if self.discounted else w


@dataclasses.dataclass(frozen=True)
class RewardSet:
  """Bound terms; pass `aux` into the jitted step as an argument."""
  terms: tuple[BoundReward, ...]
  aux: PyTree

  @property
  def needs_images(self) -> bool:
    return any(t.needs_images for t in self.terms)

  def costs(self, aux, batch: RewardBatch) -> dict[str, jnp.ndarray]:
    """name -> cost [B]; stop-gradiented unless the term is direct."""
    return self.costs_and_embeddings(aux, batch)[0]

  def costs_and_embeddings(self, aux, batch: RewardBatch, embed=()):
    """(costs as `costs`, {name: unit embedding [B, D]} for the terms in `embed`).

    A term in `embed` must have an embedding; its embedding is computed once and
    gives both its cost and its (stop-gradiented, L2-normalised) embedding.
    """
    if self.needs_images and batch.images is None:
      raise ValueError('RewardBatch.images (decoded x0_hat) is required by rewards '
                       f'{[t.name for t in self.terms if t.needs_images]}.')
    costs, embeddings = {}, {}
    for term in self.terms:
      if term.name in embed:
        e = term.embedding.embed(aux[term.name], batch)
        c = cosine_cost(e, term.embedding.reference(aux[term.name], batch))
        embeddings[term.name] = jax.lax.stop_gradient(_l2_normalize(e))
      else:
        c = term.fn(aux[term.name], batch)
      c = c.astype(jnp.float32)
      costs[term.name] = c if term.direct else jax.lax.stop_gradient(c)
    return costs, embeddings

  def reference(self, aux, name: str, batch: RewardBatch):
    """The reference embedding term `name`'s cost compares with ([B, D] or [D])."""
    term = next(t for t in self.terms if t.name == name)
    return term.embedding.reference(aux[name], batch)


def build_rewards(spec, ctx: RewardContext | None = None) -> RewardSet:
  """Parses `spec` and binds each term (loads encoders, embeds references)."""
  ctx = ctx or RewardContext()
  terms, aux = [], {}
  for name, weight in parse_reward_spec(spec):
    reward = REWARDS[name]
    fn, aux[name] = reward.bind(ctx)
    if reward.embedding and not isinstance(fn, EmbeddingCost):
      raise TypeError(f'reward {name!r} is registered with embedding=True but its bind '
                      'did not return an EmbeddingCost.')
    terms.append(BoundReward(
        name=name, weight=weight, fn=fn, needs_images=reward.needs_images,
        critic_input=reward.critic_input, discounted=reward.discounted,
        direct=bool(ctx.dino_direct) and name == 'dino'))
  return RewardSet(tuple(terms), aux)

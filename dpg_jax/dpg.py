"""The DPG objective: Algorithm 1 of the paper, in the joint train step.

Per step, from ONE UNet forward pass on the instance half of the batch:
  * policy (Eq. 3, 11): minimise  prior_loss_weight * prior MSE
                                  + instance_mse_weight * ||eps - eps_hat||^2
                                  + sum_i w_i * g_i(t) * Q_i(input_i(x0_hat))
    where g_i(t) = gamma**t for discounted rewards (look_forward, Eq. 9) and,
    with an embedding critic (dpg.critic.arch='embedding'), Q_i is
    1 - cos(e_hat_i(input_i), reference_i) instead of a scalar output. The
    gradient reaches the UNet (and text encoder) *through* each critic Q_i:
    the critics' params are constants for this update.
  * critics (Eq. 4): one SGD/Adam step each on MSE(Q_i(input_i), cost_i) with
    x0_hat detached, after the policy step (as the authors' code); an embedding
    critic's step is on ||e_hat_i - unit(embedding_i(D(x0_hat)))||^2.
Costs come from `dpg_jax.rewards` (sign: lower is better; see there). Terms
marked `direct` (DINO with dpg.dino_direct) are differentiated themselves
instead of being learned by a critic.

Train-step integration (`dpg_jax/train.py`): `policy_loss` inside the policy
loss function, `critic_update` after the optimiser update; `frozen_inputs`
returns the non-trainable arrays the step needs (VAE params when a reward
reads decoded images, encoder params and reference embeddings).
"""
import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from dpg_jax import critic as critic_lib
from dpg_jax import diffusion
from dpg_jax import rewards as rewards_lib

_CONFIG_KEYS = ('rewards', 'gamma', 'instance_mse_weight', 'critic', 'dino_model', 'clip_model',
                'tiny_encoders', 'reference_mode', 'dino_direct')


def validate_config(config) -> None:
  """Checks of config.dpg that fail before any model load or compile."""
  d = config.dpg
  missing = [k for k in _CONFIG_KEYS if k not in d]
  if missing:
    raise ValueError(f'config.dpg lacks {missing}: start DPG configs from configs/default.py.')
  terms = rewards_lib.parse_reward_spec(d.rewards)
  if not terms:
    raise ValueError('config key dpg.rewards is empty: name at least one reward, e.g. '
                     "'look_forward:1.0'.")
  if not 0.0 < d.gamma <= 1.0:
    raise ValueError(f'config key dpg.gamma={d.gamma}: expected 0 < gamma <= 1.')
  if d.reference_mode not in ('mean', 'per_image'):
    raise ValueError(f"config key dpg.reference_mode={d.reference_mode!r}: expected 'mean' or "
                     "'per_image'.")
  critic_lib.validate_critic_config(d.critic)
  if d.critic.arch in critic_lib.EMBEDDING_ARCHS:
    learned = [t.name for t in terms if not (d.dino_direct and t.name == 'dino')]
    plain = [n for n in learned if not rewards_lib.REWARDS[n].embedding]
    if plain:
      with_emb = sorted(n for n, r in rewards_lib.REWARDS.items() if r.embedding)
      raise ValueError(f'config key dpg.critic.arch={d.critic.arch!r} regresses a reward '
                       f'embedding, but reward(s) {plain} in dpg.rewards have none (rewards '
                       f'with one: {with_emb}).')


@dataclasses.dataclass(frozen=True, eq=False)
class DPG:
  """Static description of the DPG terms of one run (closed over by the step)."""
  terms: tuple                       # rewards_lib.BoundReward, one per reward
  reward_set: rewards_lib.RewardSet
  critic_cfg: Any
  gamma: float
  instance_mse_weight: float
  latent_shape: tuple                # (C, h, w) of one latent
  decode: Any = None                 # sd.decode_latents, when a reward needs images
  templates: Any = None              # name -> CriticState (fixes modules/optimisers)
  inputs: Any = None                 # name -> critic input kind (critic.critic_input)
  num_references: int = 1

  # -- construction (host, once per run) --------------------------------------
  @classmethod
  def build(cls, config, sd, reference_images, prompts, workdir: str = '', *,
            dino=None, clip=None) -> 'DPG':
    """Parses config.dpg and binds the rewards (loads encoders, embeds references).

    dino / clip: optional pre-loaded (encoder, params) that replace
    dpg.dino_model / dpg.clip_model (the benchmark's random SD-size encoders).
    """
    validate_config(config)
    d = config.dpg
    dino = d.dino_model if dino is None else dino
    clip = d.clip_model if clip is None else clip
    names = {t.name for t in rewards_lib.parse_reward_spec(d.rewards)}
    if d.tiny_encoders and isinstance(dino, str) and isinstance(clip, str):
      from dpg_jax import encoders  # pylint: disable=g-import-not-at-top
      base = os.path.join(workdir, 'pretrained_tiny_encoders')
      if 'dino' in names:
        dino = encoders.build_tiny_dino(os.path.join(base, 'dino'), seed=config.seed)
      if names & {'clip_image', 'clip_text'}:
        clip = encoders.build_tiny_clip(os.path.join(base, 'clip'), seed=config.seed)
    ctx = rewards_lib.RewardContext(
        reference_images=reference_images, prompts=list(prompts),
        identifier=config.data.identifier, dino=dino, clip=clip,
        reference_mode=d.reference_mode, dino_direct=d.dino_direct)
    reward_set = rewards_lib.build_rewards(d.rewards, ctx)
    h = config.data.resolution // sd.vae_scale
    latent_shape = (sd.latent_channels, h, h)
    templates, inputs = {}, {}
    for i, term in enumerate(reward_set.terms):
      if not term.direct:
        cfg = _critic_cfg(d.critic, term)
        inputs[term.name] = cfg.input
        templates[term.name] = critic_lib.create_critic_state(
            cfg, jax.random.PRNGKey(config.seed + 7919 * (i + 1)), (1,) + latent_shape,
            embedding_dim=term.embedding.dim if term.embedding else 0)
    return cls(terms=reward_set.terms, reward_set=reward_set, critic_cfg=d.critic,
               gamma=float(d.gamma), instance_mse_weight=float(d.instance_mse_weight),
               latent_shape=latent_shape,
               decode=sd.decode_latents if reward_set.needs_images else None,
               templates=templates, inputs=inputs,
               num_references=max(len(reference_images), 1))

  def frozen_inputs(self, params) -> dict:
    """Non-trainable arrays for the step (arguments, never baked-in constants)."""
    out = {'rewards': self.reward_set.aux}
    if self.decode is not None:
      out['vae'] = params['vae']
    return out

  def init_critic(self, rng):
    """Fresh critic states; modules and optimisers are the templates' (stable treedef)."""
    states = {}
    for i, (name, tpl) in enumerate(sorted(self.templates.items())):
      r = jax.random.fold_in(rng, i)
      dummy = jnp.zeros((1,) + self.latent_shape, jnp.float32)
      module_params = tpl.apply_fn.__self__.init(r, dummy)['params']
      states[name] = tpl.replace(step=jnp.zeros((), jnp.int32), params=module_params,
                                 opt_state=tpl.tx.init(module_params),
                                 target_stats=critic_lib.TargetStats.create())
    return states

  # -- inside the jitted step ---------------------------------------------------
  def _reward_batch(self, frozen, x0, x0_hat, eps, eps_hat, t, index, with_images: bool):
    images = None
    if with_images and self.decode is not None:
      images = self.decode(frozen['vae'], x0_hat)
    return rewards_lib.RewardBatch(x0=x0, x0_hat=x0_hat, eps=eps, eps_hat=eps_hat, t=t,
                                   images=images, ref_ids=self._ref_ids(index))

  def _ref_ids(self, index):
    # Flipped copies (data.random_flip) follow the originals: map them back.
    return None if index is None else index % self.num_references

  def policy_loss(self, critics, frozen, *, pred, x0, eps, x_t, t, alphas_cumprod,
                  prediction_type, micro):
    """Policy part of Eq. 11 for the instance examples; differentiable in `pred`."""
    abar = jnp.asarray(alphas_cumprod)[t]
    eps_hat, x0_hat = diffusion.eps_and_x0(pred, x_t, abar, prediction_type)
    per_ex = lambda v: jnp.mean(v.reshape(v.shape[0], -1), axis=-1)
    lf_err = per_ex(jnp.square(x0_hat - x0))
    inst_mse = jnp.mean(jnp.square(eps_hat - eps))
    loss = self.instance_mse_weight * inst_mse
    terms = {'dpg/look_forward_error': jnp.mean(lf_err),
             'dpg/instance_eps_mse': inst_mse}
    direct = [term for term in self.terms if term.direct]
    if direct:
      batch = self._reward_batch(frozen, x0, x0_hat, eps, eps_hat, t,
                                 micro.get('instance_index'), with_images=True)
      costs = self.reward_set.costs(frozen['rewards'], batch)
    for term in self.terms:
      w = term.policy_weight(t, self.gamma)
      if term.direct:
        value = costs[term.name]
      else:
        inp = critic_lib.critic_input(self.inputs[term.name], x0, x0_hat, eps, eps_hat)
        value = self._critic_cost(critics, frozen, term.name, inp, x0, x0_hat,
                                  micro.get('instance_index'))
        terms[f'dpg/q_{term.name}'] = jnp.mean(value)
      loss = loss + jnp.mean(w * value)
    sg = jax.lax.stop_gradient
    aux = {'x0': sg(x0), 'x0_hat': sg(x0_hat), 'eps': sg(eps), 'eps_hat': sg(eps_hat), 't': t}
    if 'instance_index' in micro:
      aux['index'] = micro['instance_index']
    return loss, terms, aux

  def _embedding_terms(self):
    return tuple(n for n, tpl in self.templates.items() if tpl.kind == 'embedding')

  def _critic_cost(self, critics, frozen, name, inp, x0, x0_hat, index):
    """Critic `name`'s estimate of its cost [B], differentiable in `inp`.

    A scalar critic's Q; for an embedding critic 1 - cos(e_hat(inp), reference),
    the reward's own cost with the critic's embedding in place of the encoder's,
    so the reward weight means the same for both.
    """
    state = critics[name]
    if state.kind != 'embedding':
      return critic_lib.critic_value(state, inp)
    ref = self.reward_set.reference(
        frozen['rewards'], name,
        rewards_lib.RewardBatch(x0=x0, x0_hat=x0_hat, ref_ids=self._ref_ids(index)))
    return rewards_lib.cosine_cost(critic_lib.critic_embedding(state, inp), ref)

  def critic_update(self, critics, frozen, aux, rng):
    """Eq. 4 for every critic on the detached quantities of this step's forward.

    aux: `policy_loss`'s aux of every micro-batch, concatenated on axis 0.
    """
    del rng  # the critic update is deterministic given the policy's forward pass
    a = aux
    batch = self._reward_batch(frozen, a['x0'], a['x0_hat'], a['eps'], a['eps_hat'], a['t'],
                               a.get('index'), with_images=True)
    costs, embeddings = self.reward_set.costs_and_embeddings(
        frozen['rewards'], batch, embed=self._embedding_terms())
    new, metrics = dict(critics), {}
    # A non-finite update of a critic with skip_nonfinite was skipped (its
    # state is unchanged and finite): reported, but not a reason to stop.
    nonfinite, skipped = jnp.zeros(()), jnp.zeros(())
    for term in self.terms:
      metrics[f'dpg/cost_{term.name}'] = jnp.mean(costs[term.name])
      if term.direct:
        continue
      inp = critic_lib.critic_input(self.inputs[term.name], batch.x0, batch.x0_hat, batch.eps,
                                    batch.eps_hat)
      pred = self._critic_cost(critics, frozen, term.name, inp, batch.x0, batch.x0_hat,
                               a.get('index'))
      target = embeddings.get(term.name, costs[term.name])
      new[term.name], m = critic_lib.critic_update(critics[term.name], inp, target)
      metrics[f'dpg/critic_pred_{term.name}'] = jnp.mean(pred)
      for k, v in m.items():
        metrics[k.replace('critic/', f'critic_{term.name}/')] = v
      if critics[term.name].skip_nonfinite:
        skipped = jnp.maximum(skipped, m['critic/nonfinite'])
      else:
        nonfinite = jnp.maximum(nonfinite, m['critic/nonfinite'])
    metrics['dpg/critic_nonfinite'] = nonfinite
    metrics['dpg/critic_skipped'] = skipped
    return new, metrics

  def divergence_hint(self) -> str:
    c = self.critic_cfg
    if c.optimizer == 'sgd' and c.target_transform == 'none':
      return ('The critic uses the authors\' faithful setting (SGD lr '
              f'{c.learning_rate}, raw targets), which diverges on random-init or badly '
              'matched models at large t; use the robust preset '
              '(--config=configs/dreambooth_dpg.py:robust, i.e. dpg.critic.optimizer=adam, '
              'target_transform=normalize, skip_nonfinite=True).')
    return 'Check dpg.critic.learning_rate and dpg.rewards weights.'


def _critic_cfg(cfg, term):
  """The critic config of one reward; input 'auto' takes the reward's own kind."""
  c = cfg.copy_and_resolve_references()
  if c.input == 'auto':
    c.input = term.critic_input
  elif c.input not in critic_lib.INPUT_KINDS:
    raise ValueError(f"config key dpg.critic.input={c.input!r}: expected 'auto' or one of "
                     f'{critic_lib.INPUT_KINDS}.')
  return c

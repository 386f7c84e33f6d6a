"""Tests of dpg_jax.rewards: diffusion algebra, costs, registry, host callbacks."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dpg_jax import rewards


def _latents(seed, shape=(4, 4, 8, 8)):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]


def test_discount_and_policy_weight():
  t = jnp.array([0, 1, 999])
  rs = rewards.build_rewards('look_forward:2.0,reconstruction:0.5')
  lf, rec = rs.terms
  assert lf.discounted and not rec.discounted and lf.critic_input == 'residual'
  np.testing.assert_allclose(lf.policy_weight(t, 0.9), 2.0 * 0.9 ** np.array([0, 1, 999]),
                             rtol=1e-5, atol=1e-30)
  np.testing.assert_allclose(rec.policy_weight(t), 0.5)


# --- Spec parsing -------------------------------------------------------------
def test_spec_forms():
  want = (rewards.RewardTerm('look_forward', 1.0), rewards.RewardTerm('dino', 0.1))
  assert rewards.parse_reward_spec('look_forward:1.0, dino:0.1') == want
  assert rewards.parse_reward_spec('look_forward,dino:0.1') == want
  assert rewards.parse_reward_spec({'look_forward': 1, 'dino': 0.1}) == want
  # ConfigDict iterates its keys sorted.
  assert set(rewards.parse_reward_spec(
      ml_collections.ConfigDict({'look_forward': 1.0, 'dino': 0.1}))) == set(want)
  assert rewards.parse_reward_spec([('look_forward', 1.0), 'dino:0.1']) == want
  assert rewards.parse_reward_spec('') == ()


@pytest.mark.parametrize('spec, match', [
    ('look_forward:1,dinoo:0.1',
     r"dpg.rewards: unknown reward 'dinoo'; registered: .*look_forward"),
    ('dino:abc', 'dpg.rewards: weight'),
    ('dino:nan', 'must be finite'),
    ('dino,dino:2', 'listed twice'),
    (3, 'dpg.rewards: expected'),
])
def test_spec_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    rewards.parse_reward_spec(spec)


def test_registry_rejects_duplicates():
  with pytest.raises(ValueError, match='already registered'):
    rewards.register_host_reward('look_forward', lambda im, p: np.zeros(len(im)))


def test_costs_are_stop_gradient_and_need_images():
  rs = rewards.build_rewards('look_forward:1')
  x0, x0_hat, _ = _latents(2)
  grad = jax.grad(lambda z: rs.costs(rs.aux, rewards.RewardBatch(x0=x0, x0_hat=z))[
      'look_forward'].sum())(x0_hat)
  assert not np.any(np.asarray(grad))
  rs = rewards.build_rewards('host_test_needs', _ctx_with_host('host_test_needs'))
  with pytest.raises(ValueError, match='images'):
    rs.costs(rs.aux, rewards.RewardBatch(x0=x0, x0_hat=x0_hat))


# --- Host rewards -------------------------------------------------------------
def _host_fn(images, prompts):
  assert images.dtype == np.uint8 and images.ndim == 4
  return images.astype(np.float32).mean((1, 2, 3)) + np.array([len(p) for p in prompts])


def _ctx_with_host(name, fn=_host_fn, **kw):
  if name not in rewards.REWARDS:
    rewards.register_host_reward(name, fn, **kw)
  return rewards.RewardContext(prompts=['a photo of sks dog', 'sks dog on a beach'])


def test_host_reward_inside_jit_returns_numpy_values():
  ctx = _ctx_with_host('host_test_mean')
  rs = rewards.build_rewards({'host_test_mean': 0.5}, ctx)
  images = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
  ids = np.array([1, 0, 1], np.int32)
  batch = rewards.RewardBatch(x0=jnp.zeros((3, 4, 1, 1)), x0_hat=jnp.zeros((3, 4, 1, 1)),
                              images=images, prompt_ids=ids)
  cost = jax.jit(rs.costs)(rs.aux, batch)['host_test_mean']
  want = _host_fn(rewards.images_to_uint8(images).__array__(), [ctx.prompts[i] for i in ids])
  # higher_is_better (the default): the cost the critic regresses is -fn.
  np.testing.assert_allclose(cost, -want, rtol=1e-6)
  raw = jax.jit(lambda im, i: rewards.host_callback(_host_fn, im, i, ctx.prompts))(images, ids)
  np.testing.assert_array_equal(raw, want)
  assert rs.terms[0].critic_input == 'x0_hat' and rs.terms[0].needs_images


def test_host_reward_bad_shape_is_reported():
  ctx = _ctx_with_host('host_test_bad', lambda im, p: np.zeros((len(im), 2)))
  rs = rewards.build_rewards('host_test_bad', ctx)
  batch = rewards.RewardBatch(x0=jnp.zeros((2, 4, 1, 1)), x0_hat=jnp.zeros((2, 4, 1, 1)),
                              images=jnp.zeros((2, 8, 8, 3)))
  with pytest.raises(Exception, match='expected'):
    jax.block_until_ready(jax.jit(rs.costs)(rs.aux, batch))


def test_strip_identifier():
  assert rewards.strip_identifier('a photo of sks dog', 'sks') == 'a photo of dog'
  assert rewards.strip_identifier('a sks-like sksy dog', 'sks') == 'a -like sksy dog'
  assert rewards.strip_identifier('a dog', '') == 'a dog'


# --- Image rewards with tiny random encoders ----------------------------------
@pytest.fixture(scope='module')
def tiny_encoders(tmp_path_factory):
  from dpg_jax import encoders  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('encoders')
  return (encoders.load_dino(encoders.build_tiny_dino(str(root / 'dino'))),
          encoders.load_clip(encoders.build_tiny_clip(str(root / 'clip'))))


def _images(seed, n=2, size=16):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3)).astype(np.uint8)


def _image_batch(images, **kw):
  n = len(images)
  return rewards.RewardBatch(x0=jnp.zeros((n, 4, 1, 1)), x0_hat=jnp.zeros((n, 4, 1, 1)),
                             images=jnp.asarray(images, jnp.float32) / 127.5 - 1.0, **kw)


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_cosine_cost(emb, ref):
  """1 - cos, float64: the reference for rewards.cosine_cost."""
  return 1.0 - np.sum(_unit(emb) * _unit(ref), axis=-1)


def _embed(encoder, images):
  """The encoder's own image embeddings of uint8 images (float64, host)."""
  enc, params = encoder
  return np.asarray(jax.jit(enc.embed_images)(params, jnp.asarray(images)), np.float64)


def test_dino_reward_is_one_minus_cosine_to_the_references(tiny_encoders):
  dino, _ = tiny_encoders
  refs, others = _images(0), _images(1)
  ids = jnp.array([1, 0])  # each image against the other's reference
  ctx = rewards.RewardContext(reference_images=refs, dino=dino, reference_mode='per_image')
  rs = rewards.build_rewards('dino:0.1', ctx)
  assert rs.needs_images and rs.terms[0].critic_input == 'x0_hat'
  costs = jax.jit(rs.costs)
  same = costs(rs.aux, _image_batch(refs, ref_ids=jnp.array([0, 1])))['dino']
  np.testing.assert_allclose(same, 0.0, atol=1e-5)
  e_ref, e_other = _embed(dino, refs), _embed(dino, others)
  other = np.asarray(costs(rs.aux, _image_batch(others, ref_ids=ids))['dino'])
  want = _np_cosine_cost(e_other, e_ref[[1, 0]])
  np.testing.assert_allclose(other, want, atol=1e-5)
  assert want.min() > 1e-3  # random images: clearly not the zero of `same`
  np.testing.assert_array_equal(rewards.paper_reward(other), -other)
  # Mean mode: the reference is the mean of the photos' unit embeddings.
  ctx = rewards.RewardContext(reference_images=refs, dino=dino)
  rs = rewards.build_rewards('dino', ctx)
  out = jax.jit(rs.costs)(rs.aux, _image_batch(others))
  np.testing.assert_allclose(out['dino'], _np_cosine_cost(e_other, _unit(e_ref).mean(0)),
                             atol=1e-5)


@pytest.mark.parametrize('direct', [False, True])
def test_dino_gradient_only_when_direct(tiny_encoders, direct):
  dino, _ = tiny_encoders
  ctx = rewards.RewardContext(reference_images=_images(0), dino=dino, dino_direct=direct)
  rs = rewards.build_rewards('dino', ctx)
  assert rs.terms[0].direct == direct
  batch = _image_batch(_images(2))
  grad = jax.jit(jax.grad(lambda im: rs.costs(rs.aux, batch.replace(images=im))['dino'].sum()))(
      batch.images)
  assert np.any(np.asarray(grad) != 0) == direct


def test_clip_rewards(tiny_encoders):
  _, clip = tiny_encoders
  refs = _images(3)
  ctx = rewards.RewardContext(reference_images=refs, clip=clip, identifier='sks',
                              prompts=['a photo of sks dog', 'a photo of dog'],
                              reference_mode='per_image')
  rs = rewards.build_rewards('clip_text:1,clip_image:1', ctx)
  # The identifier is removed before embedding the prompt.
  np.testing.assert_allclose(rs.aux['clip_text']['text'][0], rs.aux['clip_text']['text'][1],
                             atol=1e-6)
  out = jax.jit(rs.costs)(rs.aux, _image_batch(refs, ref_ids=jnp.array([0, 1]),
                                               prompt_ids=jnp.array([0, 1])))
  np.testing.assert_allclose(out['clip_image'], 0.0, atol=1e-5)
  enc, params = clip
  text = np.asarray(jax.jit(enc.text_features)(params, enc.tokenize(['a photo of dog'])),
                    np.float64)
  want = _np_cosine_cost(_embed(clip, refs), text)
  np.testing.assert_allclose(out['clip_text'], want, atol=1e-5)
  assert want.min() > 1e-3


def test_image_rewards_need_models_and_references():
  with pytest.raises(ValueError, match='dpg.dino_model'):
    rewards.build_rewards('dino', rewards.RewardContext())
  with pytest.raises(ValueError, match='reference images'):
    rewards.build_rewards('dino', rewards.RewardContext(dino=(None, None)))


def test_embedding_rewards_expose_embedding_and_reference(tiny_encoders):
  """dino / clip_image / clip_text: costs_and_embeddings gives the same costs as
  `costs` (bit for bit) and the encoder's unit embedding; `reference` is what the
  cost compares with; rewards without an embedding have none."""
  dino, clip = tiny_encoders
  refs, others = _images(0), _images(1)
  ctx = rewards.RewardContext(reference_images=refs, dino=dino, clip=clip,
                              prompts=['a photo of sks dog'], identifier='sks',
                              reference_mode='per_image')
  rs = rewards.build_rewards('dino:0.1,clip_image:1,clip_text:1,look_forward:1', ctx)
  assert [t.embedding is not None for t in rs.terms] == [True, True, True, False]
  assert [t.embedding.dim for t in rs.terms[:3]] == [dino[0].embed_dim, clip[0].embed_dim,
                                                      clip[0].embed_dim]
  batch = _image_batch(others, ref_ids=jnp.array([1, 0]))
  names = ('dino', 'clip_image', 'clip_text')
  costs, emb = jax.jit(lambda a, b: rs.costs_and_embeddings(a, b, embed=names))(rs.aux, batch)
  plain = jax.jit(rs.costs)(rs.aux, batch)
  for name in plain:
    np.testing.assert_array_equal(costs[name], plain[name])
  assert sorted(emb) == sorted(names)
  np.testing.assert_allclose(emb['dino'], _unit(_embed(dino, others)), atol=1e-5)
  np.testing.assert_allclose(emb['clip_image'], _unit(_embed(clip, others)), atol=1e-5)
  for name in names:
    ref = np.asarray(rs.reference(rs.aux, name, batch))
    np.testing.assert_allclose(costs[name], _np_cosine_cost(emb[name], ref), atol=1e-5)
  np.testing.assert_allclose(rs.reference(rs.aux, 'dino', batch),
                             rs.aux['dino']['reference'][np.array([1, 0])])

"""The judge: a small CNN that reads a toy scene's attributes off its pixels.

One head per `world.LABELS` entry (class, body colour, pattern colour,
pattern, mark, context). Trained on the generator's labels (pretrain.py),
on clean scenes and their VAE reconstructions, so it reads generated images
as well as photos. It is the measuring instrument of the toy world: whether
the base model draws what a prompt names, and whether a personalized model
draws the subject.
"""
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpg_jax.toyworld import world

HEADS = tuple(world.LABELS)


class Judge(nn.Module):
  """uint8-range NHWC images in [-1, 1] -> {head: logits [B, n]}."""
  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Conv(16, (3, 3), strides=(2, 2), name='stem')(x))  # 32x32
    for i, ch in enumerate((32, 64, 64)):                               # -> 4x4
      x = nn.Conv(ch, (3, 3), name=f'conv{i}a')(x)
      x = nn.gelu(nn.GroupNorm(8, name=f'norm{i}')(x))
      x = nn.gelu(nn.Conv(ch, (3, 3), strides=(2, 2), name=f'conv{i}b')(x))
    x = x.reshape(x.shape[0], -1)  # [B, 4*4*64]: keeps where things are
    x = nn.gelu(nn.Dense(128, name='hidden')(x))
    return {h: nn.Dense(len(world.LABELS[h]), name=h)(x) for h in HEADS}


def init_params(rng):
  return Judge().init(rng, jnp.zeros((1, 64, 64, 3)))['params']


def save(path, params):
  with open(path, 'wb') as f:
    f.write(flax.serialization.msgpack_serialize(jax.device_get(params)))


def load(path=None):
  """The judge's params (default: the shipped judge)."""
  from dpg_jax.toyworld import weights  # pylint: disable=g-import-not-at-top
  path = path or weights.JUDGE_PATH
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no toy-world judge weights; rebuild them with '
                            'python -m dpg_jax.toyworld.pretrain --stage=judge.')
  with open(path, 'rb') as f:
    tree = flax.serialization.msgpack_restore(f.read())
  return jax.tree.map(jnp.asarray, tree)


@jax.jit
def _logits(params, x):
  return Judge().apply({'params': params}, x)


def probabilities(params, images_uint8, batch_size: int = 64) -> dict:
  """{head: float [N, n] softmax} for uint8 [N, 64, 64, 3] images."""
  images = np.asarray(images_uint8)
  out = {h: [] for h in HEADS}
  for s in range(0, len(images), batch_size):
    x = images[s:s + batch_size].astype(np.float32) / 127.5 - 1
    pad = batch_size - len(x)
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
    logits = _logits(params, x)
    for h in HEADS:
      out[h].append(np.asarray(jax.nn.softmax(logits[h]))[:batch_size - pad])
  return {h: np.concatenate(v) for h, v in out.items()}


def accuracy(probs: dict, target: dict) -> dict:
  """{head: fraction of images whose argmax is the target} (target: {head: int or [N]})."""
  return {h: float(np.mean(np.argmax(probs[h], -1) == np.asarray(t)))
          for h, t in target.items()}


def attribute_score(probs: dict, attributes: dict) -> float:
  """Mean over `attributes` ({head: value name}) of the judge's probability of it.

  The toy subjects' fidelity measure: 1 when every image shows every named
  attribute for certain.
  """
  scores = [np.mean(probs[h][:, world.LABELS[h].index(v)]) for h, v in attributes.items()]
  return float(np.mean(scores))

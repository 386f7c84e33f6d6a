"""The scorer: DINO, CLIP-I and CLIP-T of generated images, and the real-image row.

Metrics (DreamBooth paper, Sec. 4.1), raw cosine similarities (no x100, x2.5):
  DINO    mean over every (generated, reference) pair of a subject of the
          cosine between DINO ViT-S/16 [CLS] embeddings;
  CLIP-I  the same with CLIP ViT-B/32 image embeddings;
  CLIP-T  mean cosine between the CLIP text embedding of the prompt with the
          identifier removed and each generated image;
  Real images: each reference photo against the subject's other photos
          (self-pairs excluded), DINO and CLIP-I only.
The maths are pure, jit-able functions of embeddings; `Scorer` holds the two
encoders, each compiled once, and turns images into those numbers.
"""
import collections
import dataclasses
import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpg_jax import encoders

METRICS = ('dino', 'clip_i', 'clip_t')


# -----------------------------------------------------------------------------
# Metric math (pure, jit-able).
# -----------------------------------------------------------------------------
def pair_similarity(generated, references) -> jnp.ndarray:
  """[N, D] x [R, D] -> [N]: each generated image's mean cosine to the references."""
  return jnp.mean(encoders.cosine_similarity(generated, references), axis=1)


def pair_mean(generated, references) -> jnp.ndarray:
  """Mean cosine over all (generated, reference) pairs (DINO, CLIP-I)."""
  return encoders.mean_cosine_similarity(generated, references)


def self_excluded_mean(embeddings) -> jnp.ndarray:
  """Mean cosine over ordered pairs (i, j), i != j: the real-image row.

  NaN for fewer than two images (there is no pair).
  """
  n = embeddings.shape[0]
  sim = encoders.cosine_similarity(embeddings, embeddings)
  off_diagonal = jnp.sum(sim) - jnp.trace(sim)
  return off_diagonal / (n * (n - 1)) if n > 1 else jnp.float32(jnp.nan)


def text_similarity(text, images) -> jnp.ndarray:
  """[P] text embedding x [N, P] image embeddings -> [N] cosines (CLIP-T)."""
  return encoders.cosine_similarity(images, text[None])[:, 0]


@jax.jit
def _prompt_metrics(gen_dino, ref_dino, gen_clip, ref_clip, text):
  return {'dino': pair_similarity(gen_dino, ref_dino),
          'clip_i': pair_similarity(gen_clip, ref_clip),
          'clip_t': text_similarity(text, gen_clip)}


@jax.jit
def _real_metrics(ref_dino, ref_clip):
  return {'dino': self_excluded_mean(ref_dino), 'clip_i': self_excluded_mean(ref_clip)}


# -----------------------------------------------------------------------------
# The scorer: DINO + CLIP, each compiled once.
# -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class References:
  """A subject's reference embeddings (computed once per subject)."""
  dino: np.ndarray   # [R, D]
  clip: np.ndarray   # [R, P]


class Scorer:
  """DINO / CLIP-I / CLIP-T of generated images against a subject's photos.

  Images (NHWC uint8 or float [-1, 1], or a list of HWC arrays of mixed sizes)
  are preprocessed one at a time (one small compile per image size) and
  embedded in batches padded to `batch_size`: each encoder compiles once.
  """

  def __init__(self, dino: encoders.DinoEncoder, dino_params, clip: encoders.ClipEncoder,
               clip_params, *, batch_size: int = 16):
    if batch_size < 1:
      raise ValueError(f'config key scorer.batch_size={batch_size}: expected >= 1.')
    self.dino, self.clip = dino, clip
    self.params = {'dino': dino_params, 'clip': clip_params}
    self.batch_size = int(batch_size)
    self.trace_counts = collections.Counter()  # tests assert one compile per encoder
    self._prep = {'dino': jax.jit(dino.preprocess), 'clip': jax.jit(clip.preprocess)}
    self._embed = {'dino': jax.jit(functools.partial(self._traced, 'dino', dino.embed)),
                   'clip': jax.jit(functools.partial(self._traced, 'clip',
                                                     clip.image_features))}
    self._text = jax.jit(functools.partial(self._traced, 'text', clip.text_features))

  def _traced(self, name, fn, params, x):
    self.trace_counts[name] += 1
    return fn(params, x)

  @classmethod
  def load(cls, dino_model: str, clip_model: str, *, batch_size: int = 16,
           dtype: str = 'float32') -> 'Scorer':
    dino, dino_params = encoders.load_dino(dino_model, dtype=dtype,
                                           config_key='scorer.dino_model')
    clip, clip_params = encoders.load_clip(clip_model, dtype=dtype,
                                           config_key='scorer.clip_model')
    return cls(dino, dino_params, clip, clip_params, batch_size=batch_size)

  def _batched(self, fn, params, rows: np.ndarray) -> np.ndarray:
    """fn(params, rows) in chunks of batch_size, the last padded with zeros."""
    b, n = self.batch_size, rows.shape[0]
    out = []
    for i in range(0, n, b):
      chunk = rows[i:i + b]
      if chunk.shape[0] < b:
        pad = np.zeros((b - chunk.shape[0],) + chunk.shape[1:], chunk.dtype)
        chunk = np.concatenate([chunk, pad])
      out.append(fn(params, chunk))
    return np.concatenate([np.asarray(o) for o in out])[:n]

  def embed_images(self, kind: str, images) -> np.ndarray:
    """'dino' [CLS] or 'clip' image embeddings, float32 [N, D]."""
    if kind not in self._embed:
      raise ValueError(f'kind={kind!r}: expected dino or clip.')
    if len(images) == 0:
      raise ValueError('embed_images got no images.')
    pixels = np.concatenate(
        [np.asarray(self._prep[kind](np.asarray(im)[None])) for im in images])
    return self._batched(self._embed[kind], self.params[kind], pixels)

  def embed_texts(self, prompts: Sequence[str]) -> np.ndarray:
    """CLIP text embeddings float32 [N, P] of `prompts` (used as given)."""
    ids = self.clip.tokenize(list(prompts))
    return self._batched(self._text, self.params['clip'], ids)

  def references(self, images) -> References:
    return References(dino=self.embed_images('dino', images),
                      clip=self.embed_images('clip', images))

  def score(self, images, clip_t_prompt: str, refs: References) -> dict:
    """Per-image and mean DINO / CLIP-I / CLIP-T of one prompt's images.

    `clip_t_prompt` is the prompt as CLIP-T reads it (identifier removed).
    """
    text = self.embed_texts([clip_t_prompt])[0]
    per_image = jax.device_get(_prompt_metrics(
        self.embed_images('dino', images), refs.dino,
        self.embed_images('clip', images), refs.clip, text))
    out = {m: float(np.mean(per_image[m])) for m in METRICS}
    out['per_image'] = {m: [float(v) for v in per_image[m]] for m in METRICS}
    return out

  def real_images(self, refs: References) -> dict:
    """The 'Real images' upper bound of one subject (self-pairs excluded).

    None where the subject has a single photo (no pair to compare).
    """
    m = jax.device_get(_real_metrics(refs.dino, refs.clip))
    return {k: None if np.isnan(v) else float(v) for k, v in m.items()}


def make_scorer(config, workdir: str) -> Scorer:
  """The scorer of an evaluation config (`config.scorer`); tiny encoders live in `workdir`."""
  sc = config.scorer
  dino_model, clip_model = sc.dino_model, sc.clip_model
  if sc.tiny:
    base = os.path.join(workdir, 'tiny_encoders')
    dino_model = encoders.build_tiny_dino(os.path.join(base, 'dino'), seed=config.seed)
    clip_model = encoders.build_tiny_clip(os.path.join(base, 'clip'), seed=config.seed)
  return Scorer.load(dino_model, clip_model, batch_size=sc.batch_size)

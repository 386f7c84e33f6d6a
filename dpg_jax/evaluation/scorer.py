"""The scorer: DINO, CLIP-I and CLIP-T of generated images, and the real-image row.

Metrics (DreamBooth paper, Sec. 4.1), raw cosine similarities (no x100, x2.5):
  DINO    mean over every (generated, reference) pair of a subject of the
          cosine between DINO ViT-S/16 [CLS] embeddings;
  CLIP-I  the same with CLIP ViT-B/32 image embeddings;
  CLIP-T  mean cosine between the CLIP text embedding of the prompt with the
          identifier removed and each generated image;
  Real images: each reference photo against the subject's other photos
          (self-pairs excluded), DINO and CLIP-I only.
Toy-world subjects (config key scorer.judge), the toy world's judge
(dpg_jax/toyworld/judge.py) adds:
  judge_subject  its mean probability of the subject's attributes (class,
                 colours, pattern, mark) per image, `judge.attribute_score`;
                 the real-image row gets it on the reference photos;
  judge_context  the fraction of images whose context argmax is the context
                 the prompt names (None for prompts that name none).
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
# Toy-world subjects with config key scorer.judge ('judge_': records name their subject
# under 'subject').
JUDGE_METRICS = ('judge_subject', 'judge_context')
JUDGE_RESOLUTION = 64                    # the judge reads 64 x 64 scenes


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
  # With the judge: the toy subject's attributes ({head: value}) and the
  # judge's per-photo score of them [R].
  attributes: dict | None = None
  judge_subject: np.ndarray | None = None


def validate_judge(config) -> None:
  """Config key scorer.judge: '' (off), 'toyworld' or a file, on toy-world subjects only."""
  judge = config.scorer.get('judge', '')
  if not judge:
    return
  if judge != 'toyworld' and not os.path.isfile(judge):
    raise ValueError(f'config key scorer.judge={judge!r}: expected \'\' (off), \'toyworld\' '
                     '(the shipped judge) or a judge .msgpack file.')
  if config.dataset != 'toyworld' or config.synthetic_subjects > 0:
    raise ValueError(f'config key scorer.judge={judge!r}: the judge reads toy-world subjects '
                     f'only (config key dataset={config.dataset!r}, synthetic_subjects='
                     f'{config.synthetic_subjects}); set dataset=\'toyworld\' or '
                     'scorer.judge=\'\'.')


def _judge_pixels(images) -> np.ndarray:
  """uint8 [N, 64, 64, 3] of images (uint8 or float [-1, 1], any square size)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = []
  for im in images:
    im = np.asarray(im)
    if im.dtype != np.uint8:
      im = np.clip(np.round((im.astype(np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)
    if im.shape[:2] != (JUDGE_RESOLUTION, JUDGE_RESOLUTION):
      im = np.asarray(Image.fromarray(im).resize((JUDGE_RESOLUTION,) * 2, Image.BICUBIC))
    out.append(im)
  return np.stack(out)


class Scorer:
  """DINO / CLIP-I / CLIP-T of generated images against a subject's photos.

  Images (NHWC uint8 or float [-1, 1], or a list of HWC arrays of mixed sizes)
  are preprocessed one at a time (one small compile per image size) and
  embedded in batches padded to `batch_size`: each encoder compiles once.
  """

  def __init__(self, dino: encoders.DinoEncoder, dino_params, clip: encoders.ClipEncoder,
               clip_params, *, batch_size: int = 16, judge_params=None):
    if batch_size < 1:
      raise ValueError(f'config key scorer.batch_size={batch_size}: expected >= 1.')
    self.dino, self.clip = dino, clip
    self.judge_params = judge_params  # None: no judge metrics
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
           dtype: str = 'float32', judge: str = '') -> 'Scorer':
    """judge: '' (none), 'toyworld' (the shipped toy-world judge) or a judge file."""
    dino, dino_params = encoders.load_dino(dino_model, dtype=dtype,
                                           config_key='scorer.dino_model')
    clip, clip_params = encoders.load_clip(clip_model, dtype=dtype,
                                           config_key='scorer.clip_model')
    judge_params = None
    if judge:
      from dpg_jax.toyworld import judge as judge_lib  # pylint: disable=g-import-not-at-top
      judge_params = judge_lib.load(None if judge == 'toyworld' else judge)
    return cls(dino, dino_params, clip, clip_params, batch_size=batch_size,
               judge_params=judge_params)

  def judge_probabilities(self, images) -> dict:
    """{judge head: [N, n] probabilities} of images (resized to the judge's 64 px)."""
    from dpg_jax.toyworld import judge as judge_lib  # pylint: disable=g-import-not-at-top
    return judge_lib.probabilities(self.judge_params, _judge_pixels(images),
                                   batch_size=self.batch_size)

  def judge_subject(self, probs: dict, attributes: dict) -> np.ndarray:
    """[N] the judge's per-image score of `attributes` (`judge.attribute_score`)."""
    from dpg_jax.toyworld import judge as judge_lib  # pylint: disable=g-import-not-at-top
    n = len(next(iter(probs.values())))
    return np.asarray([judge_lib.attribute_score({h: p[i:i + 1] for h, p in probs.items()},
                                                 attributes) for i in range(n)])

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

  def references(self, images, attributes: dict | None = None) -> References:
    """The subject's embeddings; with a judge and a toy subject's `attributes`, also
    the judge's score of them on each photo."""
    judged = self.judge_params is not None and attributes
    return References(
        dino=self.embed_images('dino', images), clip=self.embed_images('clip', images),
        attributes=dict(attributes) if judged else None,
        judge_subject=self.judge_subject(self.judge_probabilities(images), attributes)
        if judged else None)

  def score(self, images, clip_t_prompt: str, refs: References) -> dict:
    """Per-image and mean DINO / CLIP-I / CLIP-T of one prompt's images.

    `clip_t_prompt` is the prompt as CLIP-T reads it (identifier removed).
    """
    text = self.embed_texts([clip_t_prompt])[0]
    per_image = jax.device_get(_prompt_metrics(
        self.embed_images('dino', images), refs.dino,
        self.embed_images('clip', images), refs.clip, text))
    per_image = {m: np.asarray(per_image[m]) for m in METRICS}
    if refs.attributes is not None:
      per_image.update(self._judge_metrics(images, clip_t_prompt, refs.attributes))
    out = {m: None if v is None else float(np.mean(v)) for m, v in per_image.items()}
    out['per_image'] = {m: None if v is None else [float(x) for x in v]
                        for m, v in per_image.items()}
    return out

  def _judge_metrics(self, images, prompt: str, attributes: dict) -> dict:
    """{'judge_subject': [N], 'judge_context': [N] 0/1 or None where the prompt names
    no context}."""
    from dpg_jax.toyworld import checks  # pylint: disable=g-import-not-at-top
    probs = self.judge_probabilities(images)
    context = int(checks.prompt_contexts([prompt])[0])
    hit = None if context < 0 else (np.argmax(probs['context'], -1) == context).astype(
        np.float64)
    return {'judge_subject': self.judge_subject(probs, attributes), 'judge_context': hit}

  def real_images(self, refs: References) -> dict:
    """The 'Real images' upper bound of one subject (self-pairs excluded).

    None where the subject has a single photo (no pair to compare).
    """
    m = jax.device_get(_real_metrics(refs.dino, refs.clip))
    out = {k: None if np.isnan(v) else float(v) for k, v in m.items()}
    if refs.judge_subject is not None:  # the judge on the photos themselves (no pairs)
      out['judge_subject'] = float(np.mean(refs.judge_subject))
    return out


def make_scorer(config, workdir: str) -> Scorer:
  """The scorer of an evaluation config (`config.scorer`); tiny encoders live in `workdir`."""
  sc = config.scorer
  dino_model, clip_model = sc.dino_model, sc.clip_model
  if sc.tiny:
    base = os.path.join(workdir, 'tiny_encoders')
    dino_model = encoders.build_tiny_dino(os.path.join(base, 'dino'), seed=config.seed)
    clip_model = encoders.build_tiny_clip(os.path.join(base, 'clip'), seed=config.seed)
  return Scorer.load(dino_model, clip_model, batch_size=sc.batch_size,
                     judge=sc.get('judge', ''))

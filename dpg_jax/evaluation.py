"""DreamBench evaluation: DINO, CLIP-I and CLIP-T, and a resumable driver.

  python -m dpg_jax.evaluate --config=configs/eval_tiny.py --workdir=/tmp/dpg_eval_tiny
  python -m dpg_jax.evaluate --config=configs/eval_dreambench.py --workdir=runs/eval

Metrics (DreamBooth paper, Sec. 4.1), raw cosine similarities (no x100, x2.5):
  DINO    mean over every (generated, reference) pair of a subject of the
          cosine between DINO ViT-S/16 [CLS] embeddings;
  CLIP-I  the same with CLIP ViT-B/32 image embeddings;
  CLIP-T  mean cosine between the CLIP text embedding of the prompt with the
          identifier removed and each generated image;
  Real images: each reference photo against the subject's other photos
          (self-pairs excluded), DINO and CLIP-I only.
A subject's score pools its prompts (every prompt has the same number of
images, so this is also the mean of the per-prompt scores); live / object /
overall rows are means over subjects.

Work unit = (subject, method, prompt, training fingerprint). `run` trains each
(method, subject) into <workdir>/runs/<method>/<subject> (or reuses it once
export/ exists and was trained with the same settings), samples
`images_per_prompt` images per prompt with seeds seed..seed+n-1, scores them
and appends one line per finished unit to <workdir>/ledger.jsonl. A killed
evaluation rerun with the same command continues at the first unit missing
from the ledger.

The training fingerprint hashes the resolved training config of (method,
subject) without the fields that cannot change the trained weights
(`RESULT_NEUTRAL_KEYS`: logging, checkpointing, previews, devices). A changed
training setting therefore retrains that run from scratch and redoes its
units; the old units stay in the ledger but are not reported. A run's
fingerprint is written to <run>/train_fingerprint.json only once it finished,
and eval_settings.json only with the first finished unit, so a start that
fails locks nothing in. Outputs:

  ledger.jsonl                      one JSON line per finished unit (+ 'real' rows)
  images/<method>/<subject>/<fingerprint>/<prompt>_<seed>.png   generated images
  grids/<method>/<subject>.png      rows = prompts, columns = seeds
  results.json, results.md          per prompt / subject / group / overall
"""
import collections
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import sys
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import tqdm

from dpg_jax import encoders
from dpg_jax import fileio
from dpg_jax import rewards
from dpg_jax import run_config

METRICS = ('dino', 'clip_i', 'clip_t')
METRIC_NAMES = {'dino': 'DINO', 'clip_i': 'CLIP-I', 'clip_t': 'CLIP-T'}
REAL = 'Real images'
GROUPS = ('live', 'object')
LEDGER = 'ledger.jsonl'
SETTINGS = 'eval_settings.json'
TRAIN_FINGERPRINT = 'train_fingerprint.json'  # in a run dir: its settings, once it finished
TRAIN_ATTEMPT = 'train_attempt.json'          # ... of the attempt in progress (resume or not)
_REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


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


# -----------------------------------------------------------------------------
# Ledger: one JSON line per finished unit, appended atomically.
# -----------------------------------------------------------------------------
def record_key(record: dict) -> tuple:
  if record['kind'] == 'real':
    return ('real', record['subject'])
  # Units of other training settings (or of ledgers older than fingerprints,
  # None) are other units: never reused for the current settings.
  return ('prompt', record['subject'], record['method'], int(record['prompt_index']),
          record.get('train_fingerprint'))


class Ledger:
  """Finished units of an evaluation, keyed by `record_key`.

  A line is written with one append + fsync; a torn last line (killed
  mid-write) is dropped and the file rewritten without it when opened.
  """

  def __init__(self, path: str):
    self.path = path
    self.records: dict[tuple, dict] = {}
    if not os.path.exists(path):
      return
    with open(path, encoding='utf-8') as f:
      text = f.read()
    lines = [l for l in text.split('\n')[:-1] if l.strip()]
    # Without a final newline the last line may be torn: split()[-1] drops it.
    torn = int(bool(text.split('\n')[-1].strip()))
    bad = 0
    for line in lines:
      try:
        rec = json.loads(line)
        key = record_key(rec)
      except (ValueError, KeyError, TypeError):
        bad += 1
        continue
      self.records.setdefault(key, rec)  # first wins: units are never redone
    if torn or bad or len(self.records) != len(lines):
      logging.warning('Ledger %s: dropping %d torn, %d unreadable and %d duplicate lines.',
                      path, torn, bad, len(lines) - bad - len(self.records))
      fileio.atomic_write_text(path, ''.join(json.dumps(r, sort_keys=True) + '\n'
                                             for r in self.records.values()))

  def __contains__(self, key) -> bool:
    return key in self.records

  def __len__(self) -> int:
    return len(self.records)

  def append(self, record: dict) -> None:
    key = record_key(record)
    if key in self.records:
      raise ValueError(f'Unit {key} is already in the ledger {self.path}.')
    line = json.dumps(record, sort_keys=True) + '\n'
    with open(self.path, 'a', encoding='utf-8') as f:
      f.write(line)
      f.flush()
      os.fsync(f.fileno())
    self.records[key] = record

  def values(self) -> list[dict]:
    return list(self.records.values())


@contextlib.contextmanager
def _workdir_lock(workdir: str):
  """Refuses a second evaluator on the same workdir (it would duplicate units)."""
  path = os.path.join(workdir, '.eval.lock')
  with open(path, 'w') as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      raise RuntimeError(f'Another evaluation holds {path}; wait for it or use another '
                         '--workdir.') from e
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


# -----------------------------------------------------------------------------
# Aggregation and reports.
# -----------------------------------------------------------------------------
def _mean(values) -> float | None:
  values = [v for v in values if v is not None and not math.isnan(v)]
  return float(np.mean(values)) if values else None


def summarize(records: Sequence[dict], methods: Sequence[str] | None = None) -> dict:
  """Per-prompt, per-subject, live/object and overall results from ledger records.

  Prompt records: kind='prompt', subject, method, prompt_index, live, dino,
  clip_i, clip_t, num_images. Real records: kind='real', subject, live, dino,
  clip_i, num_images.
  """
  prompts = sorted((r for r in records if r['kind'] == 'prompt'),
                   key=lambda r: (r['subject'], r['method'], r['prompt_index']))
  reals = {r['subject']: r for r in records if r['kind'] == 'real'}
  if methods is None:
    methods = list(dict.fromkeys(r['method'] for r in prompts))
  live = {r['subject']: bool(r['live']) for r in list(prompts) + list(reals.values())}
  subjects = sorted(live)

  per_subject = {}
  for s in subjects:
    rows = {}
    for m in methods:
      recs = [r for r in prompts if r['subject'] == s and r['method'] == m]
      if not recs:
        continue
      n = np.asarray([r['num_images'] for r in recs], np.float64)
      rows[m] = {k: float(np.sum(n * [r[k] for r in recs]) / np.sum(n)) for k in METRICS}
      rows[m].update(num_prompts=len(recs), num_images=int(n.sum()))
    if s in reals:
      rows[REAL] = {'dino': reals[s]['dino'], 'clip_i': reals[s]['clip_i'], 'clip_t': None,
                    'num_images': reals[s]['num_images']}
    per_subject[s] = rows

  def over(names):
    rows = {}
    for m in list(methods) + [REAL]:
      have = [per_subject[s][m] for s in names if m in per_subject[s]]
      if have:
        rows[m] = {k: _mean(r[k] for r in have) for k in METRICS}
        rows[m]['num_subjects'] = len(have)
    return rows

  groups = {g: over([s for s in subjects if live[s] == (g == 'live')]) for g in GROUPS}
  return {
      'methods': list(methods),
      'subjects': subjects,
      'live_subjects': [s for s in subjects if live[s]],
      'overall': over(subjects),
      'groups': groups,
      'per_subject': per_subject,
      'per_prompt': [{k: v for k, v in r.items() if k != 'kind'} for r in prompts],
  }


def _fmt(value) -> str:
  return 'N/A' if value is None or (isinstance(value, float) and math.isnan(value)) \
      else f'{value:.3f}'


def format_table(rows: dict, order: Sequence[str] | None = None) -> str:
  """Markdown table in the layout of the paper's Table 1 (methods x metrics)."""
  order = [m for m in (order or rows) if m in rows]
  lines = ['| Method | ' + ' | '.join(METRIC_NAMES[k] for k in METRICS) + ' |',
           '|---' * (len(METRICS) + 1) + '|']
  for m in order:
    lines.append(f'| {m} | ' + ' | '.join(_fmt(rows[m].get(k)) for k in METRICS) + ' |')
  return '\n'.join(lines) + '\n'


def results_markdown(results: dict) -> str:
  """The report: overall / live / object tables, then one table per subject."""
  order = list(results['methods']) + [REAL]
  n_sub = len(results['subjects'])
  n_live = len(results['live_subjects'])
  out = ['# DreamBench evaluation', '']
  info = results.get('settings', {})
  if info:
    out += [f"{n_sub} subjects ({n_live} live, {n_sub - n_live} objects), "
            f"{info.get('images_per_prompt')} images per prompt, seeds from "
            f"{info.get('seed')}; DINO: {info.get('dino_model')}, CLIP: "
            f"{info.get('clip_model')}. Raw cosine similarities.", '']
  if results.get('missing_subjects'):
    out += ['Missing subjects (not evaluated): '
            + ', '.join(results['missing_subjects']) + '.', '']
  incomplete = results.get('incomplete_units', 0)
  if incomplete:
    out += [f'**Incomplete**: {incomplete} (subject, method, prompt) units not finished.', '']
  sections = [('Overall (mean over subjects)', results['overall']),
              ('Live subjects', results['groups']['live']),
              ('Objects', results['groups']['object'])]
  for title, rows in sections:
    if rows:
      out += [f'## {title}', '', format_table(rows, order)]
  out += ['## Per subject', '']
  for s in results['subjects']:
    kind = 'live' if s in results['live_subjects'] else 'object'
    out += [f'### {s} ({kind})', '', format_table(results['per_subject'][s], order)]
  return '\n'.join(out)


def write_grid(workdir: str, records: Sequence[dict], path: str) -> str | None:
  """Grid of one (subject, method): a row per prompt, a column per seed."""
  records = sorted(records, key=lambda r: r['prompt_index'])
  if not records:
    return None
  from dpg_jax import sampling  # pylint: disable=g-import-not-at-top
  ncols = max(len(r['files']) for r in records)
  rows = []
  for r in records:
    imgs = [np.asarray(Image.open(os.path.join(workdir, f)).convert('RGB')) for f in r['files']]
    imgs += [np.zeros_like(imgs[0])] * (ncols - len(imgs))
    rows.extend(imgs)
  return sampling.save_grid(np.stack(rows), path, ncols=ncols)


# -----------------------------------------------------------------------------
# Subjects and method configs.
# -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SubjectSpec:
  """A subject to evaluate and how its training run finds the photos."""
  subject: Any                     # datasets.Subject
  data_overrides: dict             # fields of the training config's `data`


def select_subjects(requested: Sequence[str], available: Sequence[str],
                    benchmark: Sequence[str]) -> tuple[list[str], list[str]]:
  """(to evaluate, missing). () = every benchmark subject that is available.

  Missing = benchmark subjects absent from `available`, reported when none are
  requested (an explicit list is a deliberate subset). Requested subjects must
  be available: a typo or a missing folder would silently shrink the benchmark.
  """
  available = list(available)
  if requested:
    unknown = [s for s in requested if s not in available]
    if unknown:
      raise ValueError(f'config key subjects: {unknown} not available; available: '
                       f'{available or "none"}.')
    return list(requested), []
  wanted = list(benchmark) or available
  return [s for s in wanted if s in available], [s for s in wanted if s not in available]


def resolve_subjects(config, workdir: str) -> tuple[list[SubjectSpec], list[str]]:
  """The subjects of `config` (dataset or synthetic) and the missing ones."""
  from dpg_jax import datasets  # pylint: disable=g-import-not-at-top
  if config.synthetic_subjects > 0:
    from dpg_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    specs = []
    for i in range(config.synthetic_subjects):
      name = f'synthetic{i}'
      folder = os.path.join(workdir, 'subjects', name)
      data_lib.make_synthetic_subject(folder, resolution=config.synthetic_resolution,
                                      seed=config.seed + i)
      subject = datasets.Subject.from_folder(folder, config.synthetic_class_noun, live=False,
                                             name=name)
      specs.append(SubjectSpec(subject, {'instance_dir': folder}))
    names = [s.subject.name for s in specs]
    if config.subjects:
      chosen, _ = select_subjects(config.subjects, names, ())
      specs = [s for s in specs if s.subject.name in chosen]
    return specs, []
  manual_dir = config.dataset_dir or None
  available = datasets.available_subjects(config.dataset, manual_dir=manual_dir)
  benchmark = datasets.dreambench.SUBJECTS if config.dataset == 'dreambench' else ()
  names, missing = select_subjects(config.subjects, available, benchmark)
  if missing:
    logging.warning('%d of %d %s subjects are missing from %s and are NOT evaluated: %s',
                    len(missing), len(names) + len(missing), config.dataset,
                    manual_dir or 'the default source', ', '.join(missing))
  specs = []
  for name in names:
    subject = datasets.load_subject(name, dataset=config.dataset, manual_dir=manual_dir)
    specs.append(SubjectSpec(subject, {'subject': name, 'dataset': config.dataset,
                                       'dataset_dir': config.dataset_dir}))
  return specs, missing


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """'configs/x.py' or 'configs/x.py:arg' -> its get_config([arg]).

  Relative paths resolve against the current directory, then the repository.
  """
  path, _, arg = spec.partition(':')
  candidates = [pathlib.Path(path)]
  if not os.path.isabs(path):
    candidates.append(_REPO_ROOT / path)
  found = next((p for p in candidates if p.is_file()), None)
  if found is None:
    raise FileNotFoundError(f'config file {path!r} not found (looked in '
                            f'{", ".join(str(p) for p in candidates)}).')
  # Config files do `from configs import default`: put their repo on the path.
  root = str(found.resolve().parent.parent)
  if root not in sys.path:
    sys.path.insert(0, root)
  name = '_dpg_eval_cfg_' + re.sub(r'\W', '_', str(found.resolve()))
  module_spec = importlib.util.spec_from_file_location(name, found)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def apply_overrides(target: ml_collections.ConfigDict, overrides, where: str) -> None:
  """Recursively sets `overrides` on `target` (None = unset); unknown keys are errors."""
  for key, value in overrides.items():
    if value is None:  # a placeholder left unset: keep the method's value
      continue
    if key not in target:
      raise KeyError(f'config key {where}.{key}: the training config has no field {key!r}.')
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      apply_overrides(target[key], value, f'{where}.{key}')
    else:
      target[key] = value


def _short_hash(obj) -> str:
  return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


# Training-config keys (and key prefixes) that cannot change the trained
# weights: changing them reuses a finished run. Every other key, including
# keys added later, is part of the fingerprint (a new key retrains: safe).
RESULT_NEUTRAL_KEYS = (
    'log_every', 'checkpoint_every', 'max_to_keep', 'sample_every', 'export', 'export_format',
    'export_fp16',
    # Previews and --mode=sample (class images use sample.scheduler: kept).
    'sample.prompts', 'sample.negative_prompt', 'sample.seed', 'sample.num_images_per_prompt',
    'sample.num_inference_steps', 'sample.guidance_scale', 'sample.batch_size',
    'sample.source', 'sample.output_dir',
    # How, not what, is computed.
    'model.remat', 'model.remat_policy', 'model.attention', 'grad_accum_unroll', 'mesh',
    'distributed', 'cluster', 'compilation_cache_dir')


def training_fingerprint(cfg, workdir: str) -> tuple[str, dict]:
  """(hash, fields) of the training-config fields that affect the trained result.

  Paths inside `workdir` are recorded relative to it ('$WORKDIR/...'), so a
  moved evaluation workdir keeps its runs.
  """
  workdir = os.path.abspath(workdir)
  neutral = lambda key: any(key == n or key.startswith(n + '.') for n in RESULT_NEUTRAL_KEYS)
  portable = lambda v: v.replace(workdir, '$WORKDIR') if isinstance(v, str) else v
  fields = {k: portable(v) for k, v in run_config.flatten(cfg.to_dict()).items() if not neutral(k)}
  # Round-trip through JSON: tuples become lists, as in the file it is compared with.
  fields = json.loads(json.dumps(fields, sort_keys=True, default=str))
  return _short_hash(fields), fields


def _read_json(path: str):
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except ValueError:  # torn by a kill: as if absent
    return None


def _changed_keys(old: dict, new: dict) -> str:
  keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  return '; '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in keys[:8]) + (
      f'; and {len(keys) - 8} more' if len(keys) > 8 else '')


def training_config(config, method: str, spec: SubjectSpec, workdir: str):
  """The training config of (method, subject): method file + overrides + subject."""
  if method not in config.method_configs:
    raise ValueError(f'config key methods: unknown method {method!r}; config key '
                     f'method_configs has {sorted(config.method_configs)}.')
  cfg = load_config_file(config.method_configs[method])
  apply_overrides(cfg, config.train, 'train')
  d = cfg.data
  d.synthetic, d.subject, d.instance_dir = False, '', ''
  for k, v in spec.data_overrides.items():
    d[k] = v
  if cfg.finetune.method != 'custom_diffusion':  # its identifier is its new token (<new1>)
    d.identifier = config.identifier
  d.class_noun = spec.subject.class_noun
  cfg.export = True  # the evaluation samples from <run>/export
  cfg.export_format = 'flax'  # a PyTorch copy per run would cost 3.4 GB at SD1.4 size
  if cfg.model.tiny and not cfg.model.pretrained:
    # One tiny base model for all runs instead of one per run directory.
    cfg.model.pretrained = os.path.join(workdir, 'pretrained',
                                        f'tiny_{cfg.model.tiny}_seed{cfg.seed}')
  if config.share_class_images and cfg.prior_preservation and not d.class_dir:
    # Class images depend on the base model, class prompt and sampling only:
    # methods that share these reuse one set.
    from dpg_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    class_prompt = data_lib.resolve_prompts(cfg)[1]
    # Workdir-relative: a moved evaluation finds its class images (and runs).
    pretrained = cfg.model.pretrained.replace(os.path.abspath(workdir), '$WORKDIR')
    key = _short_hash([pretrained, cfg.model.tiny, cfg.model.revision,
                       class_prompt, d.resolution, d.class_sample_steps,
                       d.class_guidance_scale, cfg.seed, cfg.sample.scheduler])
    slug = re.sub(r'\W+', '_', class_prompt).strip('_')
    d.class_dir = os.path.join(workdir, 'class_images', f'{slug}_{key}')
  return cfg


def _with_identifier(prompt: str, identifier: str, own: str) -> str:
  """`prompt` naming the subject by the method's own identifier (Custom Diffusion's token)."""
  if own == identifier:
    return prompt
  return re.sub(rf'(?<!\w){re.escape(identifier)}(?!\w)', lambda _: own, prompt)


def _is_export(export_dir: str) -> bool:
  """A trained run's export: a full pipeline, or a Custom Diffusion / LoRA delta."""
  from dpg_jax import adapters  # pylint: disable=g-import-not-at-top
  return (os.path.isfile(os.path.join(export_dir, 'model_index.json'))
          or adapters.is_delta_dir(export_dir))


def _pipeline_fingerprint(export_dir: str) -> str:
  """Hash of a pipeline's configs and tokenizer (what a compiled Sampler bakes in)."""
  h = hashlib.sha1()
  for root, _, files in sorted(os.walk(export_dir)):
    for name in sorted(files):
      if name.endswith(('.json', '.txt')):
        path = os.path.join(root, name)
        h.update(os.path.relpath(path, export_dir).encode())
        with open(path, 'rb') as f:
          h.update(f.read())
  return h.hexdigest()


# -----------------------------------------------------------------------------
# The driver.
# -----------------------------------------------------------------------------
def validate_config(config) -> None:
  if not config.methods:
    raise ValueError('config key methods is empty.')
  if len(set(config.methods)) != len(config.methods):
    raise ValueError(f'config key methods={tuple(config.methods)} has duplicates.')
  if REAL in config.methods:
    raise ValueError(f'config key methods: {REAL!r} is reserved for the real-image row.')
  for m in config.methods:
    if m not in config.method_configs:
      raise ValueError(f'config key methods: unknown method {m!r}; config key '
                       f'method_configs has {sorted(config.method_configs)}.')
  if config.images_per_prompt < 1:
    raise ValueError(f'config key images_per_prompt={config.images_per_prompt}: expected >= 1.')
  k = config.get('subjects_at_once', 1)
  if not isinstance(k, int) or k < 0:
    raise ValueError(f'config key subjects_at_once={k!r}: expected an integer >= 0 '
                     '(1 = one subject per job, 0 = all at once).')
  if config.prompts_limit < 0:
    raise ValueError(f'config key prompts_limit={config.prompts_limit}: expected >= 0.')
  if config.seed < 0 or config.seed + config.images_per_prompt > 2 ** 32:
    raise ValueError(f'config key seed={config.seed}: seeds must lie in [0, 2**32).')


def eval_settings(config) -> dict:
  """What makes two evaluations' units comparable (checked on resume)."""
  s = config.sample
  return {
      'images_per_prompt': int(config.images_per_prompt),
      'seed': int(config.seed),
      'identifier': config.identifier,
      'sample': {'scheduler': s.scheduler, 'num_inference_steps': int(s.num_inference_steps),
                 'guidance_scale': float(s.guidance_scale),
                 'negative_prompt': s.negative_prompt, 'resolution': int(s.resolution)},
      'dino_model': 'tiny' if config.scorer.tiny else config.scorer.dino_model,
      'clip_model': 'tiny' if config.scorer.tiny else config.scorer.clip_model,
  }


def _check_settings(workdir: str, settings: dict) -> None:
  """Refuses settings other than those of the units already in the workdir.

  The file is written with the first finished unit (`Evaluator._record`), not
  here: a start that fails before any unit leaves the settings free.
  """
  path = os.path.join(workdir, SETTINGS)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != settings:
      diff = [f'{k}: {old.get(k)!r} -> {settings.get(k)!r}'
              for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
      raise ValueError(f'--workdir {workdir} holds an evaluation with other settings '
                       f'({"; ".join(diff)}); its units would not be comparable. Use a '
                       'new --workdir or the old settings.')


def make_scorer(config, workdir: str) -> Scorer:
  sc = config.scorer
  dino_model, clip_model = sc.dino_model, sc.clip_model
  if sc.tiny:
    base = os.path.join(workdir, 'tiny_encoders')
    dino_model = encoders.build_tiny_dino(os.path.join(base, 'dino'), seed=config.seed)
    clip_model = encoders.build_tiny_clip(os.path.join(base, 'clip'), seed=config.seed)
  return Scorer.load(dino_model, clip_model, batch_size=sc.batch_size)


class _Timer:
  """Seconds and counts of the expensive phases (throughput in the log)."""

  def __init__(self):
    self.seconds = collections.Counter()
    self.counts = collections.Counter()

  @contextlib.contextmanager
  def __call__(self, name: str, count: int = 0):
    t0 = time.perf_counter()
    yield
    self.seconds[name] += time.perf_counter() - t0
    self.counts[name] += count

  def summary(self) -> dict:
    out = {}
    for k in self.seconds:
      out[k] = {'seconds': round(self.seconds[k], 3), 'count': self.counts[k]}
      if self.counts[k]:
        out[k]['per_second'] = round(self.counts[k] / max(self.seconds[k], 1e-9), 4)
    return out


def _default_train_fn(cfg, run_dir):
  from dpg_jax import train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(cfg, run_dir)


def _default_train_many_fn(cfgs, run_dirs):
  from dpg_jax import multisubject  # pylint: disable=g-import-not-at-top
  multisubject.train_subjects(cfgs, run_dirs)


def run(config: ml_collections.ConfigDict, workdir: str, *,
        train_fn: Callable[[Any, str], Any] | None = None,
        train_many_fn: Callable[[list, list], Any] | None = None) -> dict:
  """Trains, samples, scores and reports every (subject, method, prompt) unit.

  Args:
    config: an evaluation config (configs/eval_*.py).
    workdir: where runs, images, the ledger and the results go.
    train_fn: `train_fn(training_config, run_dir)` must leave
      <run_dir>/export; default `train.train_and_evaluate`.
    train_many_fn: `train_many_fn(training_configs, run_dirs)` trains several
      subjects in one job (config.subjects_at_once != 1); default
      `multisubject.train_subjects`.

  Returns:
    The results dict also written to <workdir>/results.json.
  """
  validate_config(config)
  if jax.process_count() > 1:
    raise NotImplementedError('dpg_jax.evaluate runs on one process (the ledger and the '
                              'images are written by a single writer).')
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  with _workdir_lock(workdir):
    return Evaluator(config, workdir, train_fn or _default_train_fn,
                     train_many_fn or _default_train_many_fn).run()


class Evaluator:
  """State of one `run`: the ledger, the lazily built scorer, compiled samplers."""

  def __init__(self, config, workdir: str, train_fn, train_many_fn=_default_train_many_fn):
    self.config = config
    self.workdir = workdir
    self.train_fn = train_fn
    self.train_many_fn = train_many_fn
    self.settings = eval_settings(config)
    _check_settings(workdir, self.settings)
    self.ledger = Ledger(os.path.join(workdir, LEDGER))
    self.methods = list(config.methods)
    self.seeds = [config.seed + j for j in range(config.images_per_prompt)]
    self.timer = _Timer()
    self._scorer = None
    self._samplers = {}
    self._mesh = None
    self.specs, self.missing = [], []
    self.prompts, self.units = {}, []
    self.train_configs, self.fingerprints = {}, {}  # (method, subject) -> cfg, (hash, fields)

  @property
  def scorer(self) -> Scorer:
    # Loaded on first use: a finished evaluation only rewrites its report.
    if self._scorer is None:
      with self.timer('load_scorer'):
        self._scorer = make_scorer(self.config, self.workdir)
    return self._scorer

  def _sampler(self, sd, export_dir: str, resolution: int):
    """One compiled Sampler per distinct pipeline architecture and resolution."""
    from dpg_jax import sampling  # pylint: disable=g-import-not-at-top
    from dpg_jax import sharding  # pylint: disable=g-import-not-at-top
    key = (_pipeline_fingerprint(export_dir), resolution)
    if key not in self._samplers:
      s = self.config.sample
      self._mesh = self._mesh or sharding.make_mesh(self.config.mesh.data)
      self._samplers[key] = sampling.Sampler(
          sd, resolution=resolution, scheduler=s.scheduler,
          num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
          batch_size=s.batch_size, mesh=self._mesh)
    return self._samplers[key]

  def run(self) -> dict:
    self.specs, self.missing = resolve_subjects(self.config, self.workdir)
    if not self.specs:
      raise ValueError('No subject to evaluate (see the missing subjects above).')
    limit = self.config.prompts_limit or None
    self.prompts = {s.subject.name: s.subject.prompts(self.config.identifier)[:limit]
                    for s in self.specs}
    for spec in self.specs:
      for m in self.methods:
        cfg = training_config(self.config, m, spec, self.workdir)
        self.train_configs[m, spec.subject.name] = cfg
        self.fingerprints[m, spec.subject.name] = training_fingerprint(cfg, self.workdir)
    self.units = [('prompt', s.subject.name, m, i, self.fingerprints[m, s.subject.name][0])
                  for s in self.specs for m in self.methods
                  for i in range(len(self.prompts[s.subject.name]))]
    n_done = sum(u in self.ledger for u in self.units)
    logging.info('Evaluating %d subjects x %d methods: %d units, %d already done.',
                 len(self.specs), len(self.methods), len(self.units), n_done)
    for m in self.methods:
      self._train_together(m)
    bar = tqdm.tqdm(total=len(self.units), initial=n_done, desc='eval', dynamic_ncols=True)
    try:
      for spec in self.specs:
        self._subject(spec, bar)
        self.report()
    finally:
      bar.close()
    results = self.report()
    logging.info('Results in %s\n%s', os.path.join(self.workdir, 'results.md'),
                 format_table(results['overall'], self.methods + [REAL]))
    for phase, t in results['timing'].items():
      if t['count'] and phase in ('generate', 'score'):
        logging.info('%s: %d images in %.1fs, %.2f images/s (compiles included)', phase,
                     t['count'], t['seconds'], t['per_second'])
    return results

  def _subject(self, spec: SubjectSpec, bar) -> None:
    subject = spec.subject
    name = subject.name
    refs = None
    for method in self.methods:
      prompts, fp = self.prompts[name], self.fingerprints[method, name][0]
      todo = [i for i in range(len(prompts))
              if ('prompt', name, method, i, fp) not in self.ledger]
      grid_path = os.path.join(self.workdir, 'grids', method, f'{name}.png')
      if todo:
        bar.set_description(f'eval {method}/{name}')
        refs = refs or self._references(subject)
        self._method(spec, method, todo, refs, bar)
      if todo or not os.path.exists(grid_path):
        write_grid(self.workdir, self._records(name, method), grid_path)
    # After the methods: a first training that fails records nothing.
    if ('real', name) not in self.ledger:
      refs = refs or self._references(subject)
      self._record({'kind': 'real', 'subject': name, 'live': subject.live,
                    'class_noun': subject.class_noun, 'num_images': len(subject.images),
                    **self.scorer.real_images(refs)})

  def _references(self, subject) -> References:
    with self.timer('score_references', len(subject.images)):
      return self.scorer.references(subject.images)

  def _record(self, record: dict) -> None:
    """Appends a finished unit; the first one also fixes the workdir's settings."""
    path = os.path.join(self.workdir, SETTINGS)
    if not os.path.exists(path):
      fileio.atomic_write_text(path, json.dumps(self.settings, indent=1, sort_keys=True))
    self.ledger.append(record)

  def _records(self, subject: str, method: str) -> list[dict]:
    fp = self.fingerprints[method, subject][0]
    return [r for r in self.ledger.values() if r['kind'] == 'prompt' and r['subject'] == subject
            and r['method'] == method and r.get('train_fingerprint') == fp]

  def _trained_run(self, cfg, method: str, name: str) -> str:
    """<workdir>/runs/<method>/<subject>, trained unless finished with these settings."""
    run_dir, record = self._start_run(method, name)
    if record is not None:
      logging.info('Training %s on %s into %s', method, name, run_dir)
      with self.timer('train', 1):
        self.train_fn(cfg, run_dir)
      self._finish_run(method, name, run_dir, record)
    if not self.config.keep_checkpoints:
      # The export holds the final weights; checkpoints only serve resuming.
      shutil.rmtree(os.path.join(run_dir, 'checkpoints'), ignore_errors=True)
    return run_dir

  def _start_run(self, method: str, name: str):
    """(run_dir, None) if finished with these settings, else (run_dir, record) ready to train.

    A run dir left by other training settings (finished, or an attempt that
    stopped) is deleted and trained from scratch: resuming it would mix them.
    """
    run_dir = os.path.join(self.workdir, 'runs', method, name)
    export_dir = os.path.join(run_dir, 'export')
    fp, fields = self.fingerprints[method, name]
    finished = _read_json(os.path.join(run_dir, TRAIN_FINGERPRINT))
    exported = _is_export(export_dir)
    if exported and finished is not None and finished.get('fingerprint') == fp:
      logging.info('Reusing the finished run %s', run_dir)
      return run_dir, None
    previous = finished or _read_json(os.path.join(run_dir, TRAIN_ATTEMPT))
    if os.path.isdir(run_dir) and (previous or {}).get('fingerprint') != fp:
      why = ('no record of its training settings' if previous is None else
             'other training settings (' + _changed_keys(previous.get('config', {}), fields)
             + ')')
      logging.warning('%s was trained with %s: deleting it and training %s on %s anew.',
                      run_dir, why, method, name)
      shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    record = json.dumps({'fingerprint': fp, 'config': fields}, indent=1, sort_keys=True)
    # Read only to decide resume vs. restart of a stopped attempt; never refuses.
    fileio.atomic_write_text(os.path.join(run_dir, TRAIN_ATTEMPT), record)
    return run_dir, record

  def _finish_run(self, method: str, name: str, run_dir: str, record: str) -> None:
    export_dir = os.path.join(run_dir, 'export')
    if not _is_export(export_dir):
      raise RuntimeError(f'Training {method} on {name} left no pipeline in {export_dir}.')
    fileio.atomic_write_text(os.path.join(run_dir, TRAIN_FINGERPRINT), record)
    os.remove(os.path.join(run_dir, TRAIN_ATTEMPT))

  def _train_together(self, method: str) -> None:
    """config.subjects_at_once > 1 (or 0 = all): the method's unfinished subjects
    are trained in groups of that many, each group one job on one mesh
    (dpg_jax/multisubject.py); `_trained_run` then finds them finished."""
    k = self.config.get('subjects_at_once', 1)
    if k == 1:
      return
    pending = []
    for spec in self.specs:
      name = spec.subject.name
      fp = self.fingerprints[method, name][0]
      if any(('prompt', name, method, i, fp) not in self.ledger
             for i in range(len(self.prompts[name]))):
        pending.append(name)
    runs = [(name, *self._start_run(method, name)) for name in pending]
    runs = [r for r in runs if r[2] is not None]
    k = k or len(runs)
    for g in range(0, len(runs), max(k, 1)):
      group = runs[g:g + k]
      names = [name for name, _, _ in group]
      logging.info('Training %s on %d subjects at once: %s', method, len(group), ', '.join(names))
      with self.timer('train', len(group)):
        self.train_many_fn([self.train_configs[method, n] for n in names],
                           [run_dir for _, run_dir, _ in group])
      for name, run_dir, record in group:
        self._finish_run(method, name, run_dir, record)

  def _method(self, spec: SubjectSpec, method: str, todo: Sequence[int], refs: References,
              bar) -> None:
    """Generates, saves, scores and records the unfinished prompts `todo`."""
    from dpg_jax import sample as sample_lib  # pylint: disable=g-import-not-at-top
    from dpg_jax import sampling  # pylint: disable=g-import-not-at-top
    config, s = self.config, self.config.sample
    subject, name = spec.subject, spec.subject.name
    prompts, seeds, ipp = self.prompts[name], self.seeds, len(self.seeds)
    cfg = self.train_configs[method, name]
    run_dir = self._trained_run(cfg, method, name)
    export_dir = os.path.join(run_dir, 'export')
    with self.timer('load_model'):
      sd, params, _ = sample_lib.load_trained(run_dir, cfg)
    sampler = self._sampler(sd, export_dir, s.resolution or cfg.data.resolution)
    # One folder per training fingerprint: other settings' units keep their files.
    image_dir = os.path.join('images', method, name, self.fingerprints[method, name][0])
    out_dir = os.path.join(self.workdir, image_dir)
    # Several prompts per sampler call fill its batch; each is recorded alone.
    per_call = max(1, s.batch_size // ipp)
    for c in range(0, len(todo), per_call):
      chunk = todo[c:c + per_call]
      with self.timer('generate', len(chunk) * ipp):
        images = sampler(params, [_with_identifier(prompts[i], config.identifier,
                                                   cfg.data.identifier)
                                  for i in chunk for _ in seeds],
                         seeds * len(chunk), s.negative_prompt)
      for k, i in enumerate(chunk):
        imgs = images[k * ipp:(k + 1) * ipp]
        names = [f'{i:02d}_{seed}.png' for seed in seeds]
        # Images first, then the ledger line: a unit in the ledger has its files.
        sampling.save_images(imgs, out_dir, names=names)
        clip_t_prompt = rewards.strip_identifier(prompts[i], config.identifier)
        with self.timer('score', ipp):
          scores = self.scorer.score(imgs, clip_t_prompt, refs)
        self._record({
            'kind': 'prompt', 'subject': name, 'method': method, 'prompt_index': i,
            'train_fingerprint': self.fingerprints[method, name][0],
            'prompt': prompts[i], 'clip_t_prompt': clip_t_prompt, 'live': subject.live,
            'class_noun': subject.class_noun, 'seeds': seeds, 'num_images': ipp,
            'files': [os.path.join(image_dir, n) for n in names], **scores})
        bar.update(1)
    if not config.keep_exports:
      shutil.rmtree(export_dir, ignore_errors=True)

  def report(self) -> dict:
    """Writes results.json and results.md from the ledger (atomically)."""
    # Only this config's units: the ledger may hold other subjects, methods
    # or prompts from earlier evaluations in the same workdir.
    wanted = set(self.units) | {('real', s.subject.name) for s in self.specs}
    records = [r for k, r in self.ledger.records.items() if k in wanted]
    results = summarize(records, self.methods)
    results['settings'] = self.settings
    results['missing_subjects'] = self.missing
    results['incomplete_units'] = sum(u not in self.ledger for u in self.units)
    results['timing'] = self.timer.summary()
    fileio.atomic_write_text(os.path.join(self.workdir, 'results.json'),
                             json.dumps(results, indent=1, sort_keys=True))
    fileio.atomic_write_text(os.path.join(self.workdir, 'results.md'), results_markdown(results))
    return results

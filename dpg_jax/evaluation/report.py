"""The report: ledger records -> the paper's Table 1 (methods x DINO, CLIP-I, CLIP-T).

A subject's score pools its prompts (every prompt has the same number of
images, so this is also the mean of the per-prompt scores) and, with training
seeds (config key train_seeds), its seeds; live / object / overall rows are
means over subjects, with their standard errors (the spread over subjects /
sqrt(n), `<metric>_se`). With two or more training seeds they also get
`<metric>_se_seeds`: the standard error over seeds of the per-seed means (each
the mean over subjects of the subject's mean under that seed). Metrics beyond
DINO / CLIP-I / CLIP-T (the toy world's judge) get columns where records
have them. Outputs, in the evaluation workdir:

  results.json, results.md          per prompt / subject / group / overall
  grids/<method>/<subject>.png      rows = prompts, columns = seeds
"""
import json
import math
import os
from typing import Sequence

import numpy as np
from PIL import Image

from dpg_jax import fileio
from dpg_jax.evaluation.scorer import JUDGE_METRICS
from dpg_jax.evaluation.scorer import METRICS

METRIC_NAMES = {'dino': 'DINO', 'clip_i': 'CLIP-I', 'clip_t': 'CLIP-T',
                'judge_subject': 'Judge subject', 'judge_context': 'Judge context'}
REAL = 'Real images'
GROUPS = ('live', 'object')


def _present(values) -> list:
  return [v for v in values if v is not None and not math.isnan(v)]


def _mean(values) -> float | None:
  values = _present(values)
  return float(np.mean(values)) if values else None


def _standard_error(values) -> float | None:
  """Standard error of the mean (sample std / sqrt(n)); None below 2 values."""
  values = _present(values)
  if len(values) < 2:
    return None
  return float(np.std(values, ddof=1) / math.sqrt(len(values)))


def metrics_of(records: Sequence[dict]) -> list[str]:
  """DINO, CLIP-I, CLIP-T, then the judge's metrics where some record has them."""
  return list(METRICS) + [k for k in JUDGE_METRICS if any(k in r for r in records)]


def _pooled(recs: Sequence[dict], key: str) -> float | None:
  """Mean of `key` over the images of `recs` (each weighted by its num_images);
  records without a value (a prompt that names no context) are left out."""
  recs = [r for r in recs if r.get(key) is not None]
  if not recs:
    return None
  n = np.asarray([r['num_images'] for r in recs], np.float64)
  return float(np.sum(n * [r[key] for r in recs]) / np.sum(n))


def summarize(records: Sequence[dict], methods: Sequence[str] | None = None) -> dict:
  """Per-prompt, per-subject, live/object and overall results from ledger records.

  Prompt records: kind='prompt', subject, method, prompt_index, live, dino,
  clip_i, clip_t, num_images (+ train_seed, judge_subject, judge_context). Real
  records: kind='real', subject, live, dino, clip_i, num_images (+ judge_subject).
  """
  prompts = sorted((r for r in records if r['kind'] == 'prompt'),
                   key=lambda r: (r['subject'], r['method'], r.get('train_seed') or 0,
                                  r['prompt_index']))
  reals = {r['subject']: r for r in records if r['kind'] == 'real'}
  if methods is None:
    methods = list(dict.fromkeys(r['method'] for r in prompts))
  metrics = metrics_of(records)
  live = {r['subject']: bool(r['live']) for r in list(prompts) + list(reals.values())}
  subjects = sorted(live)
  # Training seeds of each method (config key train_seeds); none: each method's own.
  seeds = {m: sorted({r['train_seed'] for r in prompts
                      if r['method'] == m and r.get('train_seed') is not None})
           for m in methods}

  def subject_row(recs):
    row = {k: _pooled(recs, k) for k in metrics}
    row.update(num_prompts=len(recs), num_images=int(sum(r['num_images'] for r in recs)))
    return row

  per_subject = {}
  for s in subjects:
    rows = {}
    for m in methods:
      recs = [r for r in prompts if r['subject'] == s and r['method'] == m]
      if not recs:
        continue
      rows[m] = subject_row(recs)  # pools the seeds' images
      if seeds[m]:
        rows[m]['per_seed'] = {
            str(k): subject_row([r for r in recs if r.get('train_seed') == k])
            for k in seeds[m] if any(r.get('train_seed') == k for r in recs)}
    if s in reals:
      rows[REAL] = {'dino': reals[s]['dino'], 'clip_i': reals[s]['clip_i'], 'clip_t': None,
                    'num_images': reals[s]['num_images']}
      rows[REAL].update({k: reals[s].get(k) for k in metrics if k in JUDGE_METRICS})
    per_subject[s] = rows

  def over(names):
    rows = {}
    for m in list(methods) + [REAL]:
      have = [per_subject[s][m] for s in names if m in per_subject[s]]
      if have:
        rows[m] = {k: _mean(r[k] for r in have) for k in metrics}
        # The spread of the mean over subjects (the error bar of Table 1's rows).
        rows[m].update({f'{k}_se': _standard_error(r[k] for r in have) for k in metrics})
        rows[m]['num_subjects'] = len(have)
        if len(seeds.get(m, ())) >= 2:
          # The spread over training seeds of the subject-averaged per-seed means.
          per_seed = [[r['per_seed'][str(k)] for r in have if str(k) in r['per_seed']]
                      for k in seeds[m]]
          rows[m].update({f'{k}_se_seeds': _standard_error(_mean(r[k] for r in rs)
                                                           for rs in per_seed if rs)
                          for k in metrics})
          rows[m]['num_seeds'] = sum(1 for rs in per_seed if rs)
    return rows

  groups = {g: over([s for s in subjects if live[s] == (g == 'live')]) for g in GROUPS}
  return {
      'methods': list(methods),
      'metrics': metrics,
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


def _cell(row: dict, key: str) -> str:
  """'0.695', or with the row's standard error over subjects '0.695 ± 0.012', and
  over training seeds '0.695 ± 0.012 (seeds ± 0.004)'."""
  se, se_seeds = row.get(f'{key}_se'), row.get(f'{key}_se_seeds')
  if row.get(key) is None:
    return _fmt(row.get(key))
  cell = _fmt(row[key]) if se is None else f'{_fmt(row[key])} ± {_fmt(se)}'
  return cell if se_seeds is None else f'{cell} (seeds ± {_fmt(se_seeds)})'


def format_table(rows: dict, order: Sequence[str] | None = None,
                 metrics: Sequence[str] | None = None) -> str:
  """Markdown table in the layout of the paper's Table 1 (methods x metrics; mean ±
  standard error over subjects where there are two or more). `metrics`: default
  DINO, CLIP-I, CLIP-T and the judge's where the rows have them."""
  order = [m for m in (order or rows) if m in rows]
  metrics = list(metrics or metrics_of(list(rows.values())))
  lines = ['| Method | ' + ' | '.join(METRIC_NAMES[k] for k in metrics) + ' |',
           '|---' * (len(metrics) + 1) + '|']
  for m in order:
    lines.append(f'| {m} | ' + ' | '.join(_cell(rows[m], k) for k in metrics) + ' |')
  return '\n'.join(lines) + '\n'


def results_markdown(results: dict) -> str:
  """The report: overall / live / object tables, then one table per subject."""
  order = list(results['methods']) + [REAL]
  metrics = results.get('metrics') or list(METRICS)
  n_sub = len(results['subjects'])
  n_live = len(results['live_subjects'])
  out = ['# DreamBench evaluation', '']
  info = results.get('settings', {})
  if info:
    out += [f"{n_sub} subjects ({n_live} live, {n_sub - n_live} objects), "
            f"{info.get('images_per_prompt')} images per prompt, seeds from "
            f"{info.get('seed')}; DINO: {info.get('dino_model')}, CLIP: "
            f"{info.get('clip_model')}. Raw cosine similarities.", '']
  num_seeds = max((r.get('num_seeds', 0) for r in results['overall'].values()), default=0)
  if num_seeds:
    out += [f'Mean ± standard error over subjects (each subject pools its {num_seeds} '
            'training seeds); (seeds ± ...): standard error over the training seeds of the '
            'mean over subjects under each seed.', '']
  if 'judge_subject' in metrics:
    out += ["Judge subject: the toy-world judge's mean probability of the subject's "
            'attributes; Judge context: the fraction of images in the context the prompt '
            'names (prompts that name one).', '']
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
      out += [f'## {title}', '', format_table(rows, order, metrics)]
  out += ['## Per subject', '']
  for s in results['subjects']:
    kind = 'live' if s in results['live_subjects'] else 'object'
    out += [f'### {s} ({kind})', '', format_table(results['per_subject'][s], order, metrics)]
  return '\n'.join(out)


def write_results(workdir: str, results: dict) -> None:
  """<workdir>/results.json and results.md, each written atomically."""
  fileio.atomic_write_text(os.path.join(workdir, 'results.json'),
                           json.dumps(results, indent=1, sort_keys=True))
  fileio.atomic_write_text(os.path.join(workdir, 'results.md'), results_markdown(results))


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

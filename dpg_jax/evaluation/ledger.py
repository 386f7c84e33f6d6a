"""The ledger: what an evaluation workdir has trained and scored, and how a rerun resumes.

  ledger.jsonl                    one JSON line per finished unit (+ 'real' rows)
  eval_settings.json              the settings of its units, written with the first
  runs/<method>/<subject>/train_fingerprint.json   a finished run's training settings
  runs/<method>/<subject>/train_attempt.json       ... of the attempt in progress
  (with config key train_seeds: runs/<method>/<subject>/seed<k>/...)

A unit is (subject, method, prompt, training fingerprint[, training seed]); a line is appended
only once the unit's images are on disk, so a killed evaluation rerun with the
same command continues at the first unit missing from the ledger. A run's
fingerprint file is written only once it finished and eval_settings.json only
with the first finished unit, so a start that fails locks nothing in.
"""
import contextlib
import fcntl
import json
import os
import shutil

from absl import logging

from dpg_jax import fileio

LEDGER = 'ledger.jsonl'
SETTINGS = 'eval_settings.json'
TRAIN_FINGERPRINT = 'train_fingerprint.json'  # in a run dir: its settings, once it finished
TRAIN_ATTEMPT = 'train_attempt.json'          # ... of the attempt in progress (resume or not)


# -----------------------------------------------------------------------------
# Finished units: one JSON line each, appended atomically.
# -----------------------------------------------------------------------------
def unit_key(subject: str, method: str, prompt_index: int, fingerprint: str | None,
             train_seed: int | None = None) -> tuple:
  """The key of a prompt unit; a training seed (config key train_seeds) is part of it."""
  key = ('prompt', subject, method, int(prompt_index), fingerprint)
  return key if train_seed is None else key + (int(train_seed),)


def record_key(record: dict) -> tuple:
  if record['kind'] == 'real':
    return ('real', record['subject'])
  # Units of other training settings (or of ledgers older than fingerprints,
  # None) are other units: never reused for the current settings.
  return unit_key(record['subject'], record['method'], record['prompt_index'],
                  record.get('train_fingerprint'), record.get('train_seed'))


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
def workdir_lock(workdir: str):
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
# The workdir's evaluation settings: fixed by its first finished unit.
# -----------------------------------------------------------------------------
def eval_settings(config) -> dict:
  """What makes two evaluations' units comparable (checked on resume)."""
  s = config.sample
  settings = {
      'images_per_prompt': int(config.images_per_prompt),
      'seed': int(config.seed),
      'identifier': config.identifier,
      'sample': {'scheduler': s.scheduler, 'num_inference_steps': int(s.num_inference_steps),
                 'guidance_scale': float(s.guidance_scale),
                 'negative_prompt': s.negative_prompt, 'resolution': int(s.resolution)},
      'dino_model': 'tiny' if config.scorer.tiny else config.scorer.dino_model,
      'clip_model': 'tiny' if config.scorer.tiny else config.scorer.clip_model,
  }
  if config.scorer.get('judge'):  # absent when off: older workdirs keep their settings
    settings['judge'] = config.scorer.judge
  return settings


def check_settings(workdir: str, settings: dict) -> None:
  """Refuses settings other than those of the units already in the workdir.

  The file is written with the first finished unit (`fix_settings`), not
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


def fix_settings(workdir: str, settings: dict) -> None:
  """Writes the workdir's settings unless there already (call before appending a unit)."""
  path = os.path.join(workdir, SETTINGS)
  if not os.path.exists(path):
    fileio.atomic_write_text(path, json.dumps(settings, indent=1, sort_keys=True))


# -----------------------------------------------------------------------------
# Training runs: finished (reused), stopped (resumed) or stale (retrained).
# -----------------------------------------------------------------------------
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


def is_export(export_dir: str) -> bool:
  """A trained run's export: a full pipeline, or a Custom Diffusion / LoRA delta."""
  from dpg_jax import adapters  # pylint: disable=g-import-not-at-top
  return (os.path.isfile(os.path.join(export_dir, 'model_index.json'))
          or adapters.is_delta_dir(export_dir))


def start_run(run_dir: str, fingerprint: str, fields: dict, method: str,
              name: str) -> str | None:
  """None if `run_dir` finished with these settings, else the record to finish it with.

  `fingerprint`, `fields`: `plan.training_fingerprint` of the run's training
  config. A run dir left by other training settings (finished, or an attempt
  that stopped) is deleted and trained from scratch: resuming it would mix
  them. A stopped attempt with these settings is kept: training resumes it.
  """
  finished = _read_json(os.path.join(run_dir, TRAIN_FINGERPRINT))
  exported = is_export(os.path.join(run_dir, 'export'))
  if exported and finished is not None and finished.get('fingerprint') == fingerprint:
    logging.info('Reusing the finished run %s', run_dir)
    return None
  previous = finished or _read_json(os.path.join(run_dir, TRAIN_ATTEMPT))
  if os.path.isdir(run_dir) and (previous or {}).get('fingerprint') != fingerprint:
    why = ('no record of its training settings' if previous is None else
           'other training settings (' + _changed_keys(previous.get('config', {}), fields)
           + ')')
    logging.warning('%s was trained with %s: deleting it and training %s on %s anew.',
                    run_dir, why, method, name)
    shutil.rmtree(run_dir)
  os.makedirs(run_dir, exist_ok=True)
  record = json.dumps({'fingerprint': fingerprint, 'config': fields}, indent=1, sort_keys=True)
  # Read only to decide resume vs. restart of a stopped attempt; never refuses.
  fileio.atomic_write_text(os.path.join(run_dir, TRAIN_ATTEMPT), record)
  return record


def finish_run(run_dir: str, record: str, method: str, name: str) -> None:
  """Marks `run_dir` finished with `record` (from `start_run`) once its export exists."""
  export_dir = os.path.join(run_dir, 'export')
  if not is_export(export_dir):
    raise RuntimeError(f'Training {method} on {name} left no pipeline in {export_dir}.')
  fileio.atomic_write_text(os.path.join(run_dir, TRAIN_FINGERPRINT), record)
  os.remove(os.path.join(run_dir, TRAIN_ATTEMPT))

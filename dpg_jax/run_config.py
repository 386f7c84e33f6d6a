"""The run's config on disk: stored with each checkpoint, compared on resume.

A resumed run continues the same fine-tune only if nothing that shapes the
train state or the meaning of the trained weights changed (model, trainable
parts, data, rewards, critic, optimiser, seed). Such a change is refused before
any restore; changes in `SAFE_KEYS` (length, cadences, previews, device layout)
are allowed and listed in one warning. Every start's config is kept:
`<workdir>/config.json` is the newest, earlier different ones are renamed
`config.1.json`, `config.2.json`, ... in start order.
"""
import json

from absl import logging

from dpg_jax import fileio

# Key prefixes ('a.b' or 'a.' for a whole group) a resume may change.
SAFE_KEYS = (
    'num_steps', 'log_every', 'checkpoint_every', 'max_to_keep', 'sample_every', 'export',
    'export_format', 'export_fp16',
    'sample.',                       # previews and --mode=sample
    'mesh.', 'distributed', 'cluster.', 'compilation_cache_dir',  # layout: restored into it
    'model.remat', 'model.remat_policy', 'model.attention',  # same maths, other memory / speed
    'finetune.lora_form',            # the same adapted layer, formed another way
    'grad_accum_unroll',             # the same update as straight-line code or a scan
    'data.dataset_dir',              # where the dataset lives, not which subject
)


class ConfigMismatchError(ValueError):
  """The config of a resume differs from its checkpoint's in a key that matters."""


def config_dict(config) -> dict:
  """A ConfigDict as plain JSON data (tuples become lists), as stored."""
  return json.loads(config.to_json_best_effort())


def config_text(config) -> str:
  return config.to_json_best_effort(indent=2) + '\n'


def flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def is_safe(key: str) -> bool:
  return any(key == s or (s.endswith('.') and key.startswith(s)) for s in SAFE_KEYS)


def _show(v) -> str:
  return json.dumps(v) if not isinstance(v, str) else repr(v)


def check_resume(stored: dict | None, config, where: str) -> list[str]:
  """Raises ConfigMismatchError naming every refused key and both values.

  stored: the checkpoint's config (plain dict) or None (an older checkpoint:
  nothing to compare, said in a warning). where: names the checkpoint. Returns
  the allowed changes (also logged as one warning line).
  """
  if stored is None:
    logging.warning('%s stores no config: the resume is not checked against the config it '
                    'was trained with.', where)
    return []
  old, new = flatten(stored), flatten(config_dict(config))
  refused, allowed = [], []
  for key in sorted(set(old) & set(new)):
    if old[key] == new[key]:
      continue
    item = f'{key}: {_show(old[key])} -> {_show(new[key])}'
    (allowed if is_safe(key) else refused).append(item)
    if key == 'num_steps' and new.get('lr_schedule', 'constant') != 'constant':
      allowed[-1] += f' (lr_schedule={new["lr_schedule"]!r} spans num_steps: later rates change)'
  if refused:
    raise ConfigMismatchError(
        f'config differs from the one {where} was trained with, in keys that change the '
        f'train state or what it means: {"; ".join(refused)}. Resume with the earlier '
        'values, or use a new --workdir.')
  # Keys only one side has come from a code change, not from the user.
  allowed += [f'{k}: new key' for k in sorted(set(new) - set(old))]
  allowed += [f'{k}: no longer a key' for k in sorted(set(old) - set(new))]
  if allowed:
    logging.warning('Resuming from %s with config changes: %s', where, '; '.join(allowed))
  return allowed


def stored_config(meta: dict | None, workdir: str) -> dict | None:
  """The config a checkpoint was trained with: its meta, else <workdir>/config.json
  (checkpoints written before configs were stored in them)."""
  if meta and isinstance(meta.get('config'), dict):
    return meta['config']
  path = fileio.join(workdir, 'config.json')
  try:
    return json.loads(fileio.read_text(path))
  except (OSError, ValueError):
    return None


def write_config_json(workdir: str, config) -> str | None:
  """Writes <workdir>/config.json; a different earlier one becomes config.<n>.json.

  Returns the path the earlier config was kept under, or None.
  """
  path = fileio.join(workdir, 'config.json')
  text = config_text(config)
  kept = None
  if fileio.exists(path):
    if fileio.path(path).read_bytes().decode('utf-8', errors='replace') == text:
      return None
    n = 1
    while fileio.exists(fileio.join(workdir, f'config.{n}.json')):
      n += 1
    kept = fileio.join(workdir, f'config.{n}.json')
    fileio.rename(path, kept)
    logging.info('Kept the previous start\'s config as %s', kept)
  fileio.atomic_write_text(path, text)
  return kept

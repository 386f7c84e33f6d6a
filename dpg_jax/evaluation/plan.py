"""What an evaluation runs: its subjects, and each (method, subject)'s training config.

With `train_seeds`, each (method, subject, seed) is its own run, trained with
`seed` overridden into runs/<method>/<subject>/seed<k> (`run_name`).

The training fingerprint hashes the resolved training config of (method,
subject) without the fields that cannot change the trained weights
(`RESULT_NEUTRAL_KEYS`: logging, checkpointing, previews, devices). A changed
training setting therefore retrains that run from scratch and redoes its
units (dpg_jax/evaluation/ledger.py); the old units stay in the ledger but are
not reported.
"""
import dataclasses
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import sys
from typing import Any, Sequence

from absl import logging
import ml_collections

from dpg_jax import run_config

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class SubjectSpec:
  """A subject to evaluate and how its training run finds the photos."""
  subject: Any                     # datasets.Subject
  data_overrides: dict             # fields of the training config's `data`
  attributes: dict | None = None   # a toy-world subject's {judge head: value}


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
    attributes = None
    if config.dataset == 'toyworld':  # what the judge reads (scorer.judge)
      from dpg_jax.toyworld import subjects as toy_subjects  # pylint: disable=g-import-not-at-top
      attributes = toy_subjects.get(name).attributes
    specs.append(SubjectSpec(subject, {'subject': name, 'dataset': config.dataset,
                                       'dataset_dir': config.dataset_dir}, attributes))
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


def training_seeds(config) -> list:
  """The training seeds of an evaluation: config.train_seeds, or [None] (each
  method's own `seed`, one run per (method, subject))."""
  return list(config.get('train_seeds', ())) or [None]


def run_name(method: str, subject: str, seed: int | None) -> str:
  """'<method>/<subject>' or, with training seeds, '<method>/<subject>/seed<k>'."""
  return os.path.join(method, subject) if seed is None else os.path.join(
      method, subject, f'seed{seed}')


def training_config(config, method: str, spec: SubjectSpec, workdir: str,
                    seed: int | None = None):
  """The training config of (method, subject[, training seed]): method file +
  overrides + subject (+ `seed` overridden)."""
  if method not in config.method_configs:
    raise ValueError(f'config key methods: unknown method {method!r}; config key '
                     f'method_configs has {sorted(config.method_configs)}.')
  cfg = load_config_file(config.method_configs[method])
  apply_overrides(cfg, config.train, 'train')
  # A method's own overrides (a variant of a config file without a file of its own),
  # after `train`: the more specific setting wins.
  method_overrides = config.get('method_overrides') or {}
  if method in method_overrides:
    apply_overrides(cfg, method_overrides[method], f'method_overrides.{method}')
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
  if seed is not None:
    # After the base model's path: every training seed starts from the same base.
    cfg.seed = int(seed)
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


def with_identifier(prompt: str, identifier: str, own: str) -> str:
  """`prompt` naming the subject by the method's own identifier (Custom Diffusion's token)."""
  if own == identifier:
    return prompt
  return re.sub(rf'(?<!\w){re.escape(identifier)}(?!\w)', lambda _: own, prompt)

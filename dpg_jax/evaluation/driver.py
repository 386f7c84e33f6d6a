"""The driver: trains, samples, scores and records every (subject, method, prompt) unit.

For each subject and method it trains into <workdir>/runs/<method>/<subject>
(or reuses a run finished with the same training settings, see ledger.py),
samples `images_per_prompt` images per prompt with seeds seed..seed+n-1 into
images/<method>/<subject>/<fingerprint>/<prompt>_<seed>.png, scores them
(scorer.py), appends one ledger line per finished unit (ledger.py) and
rewrites the report after each subject (report.py). With `train_seeds`, every
training seed k of (method, subject) is its own run and its own units:
runs/, images/ and grids/ get a seed<k> level below the subject.
"""
import collections
import contextlib
import hashlib
import os
import shutil
import signal
import sys
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax
import ml_collections
import tqdm

from dpg_jax import rewards
from dpg_jax.evaluation import ledger as ledger_lib
from dpg_jax.evaluation import plan
from dpg_jax.evaluation import report as report_lib
from dpg_jax.evaluation import scorer as scorer_lib


def validate_config(config) -> None:
  if not config.methods:
    raise ValueError('config key methods is empty.')
  if len(set(config.methods)) != len(config.methods):
    raise ValueError(f'config key methods={tuple(config.methods)} has duplicates.')
  if report_lib.REAL in config.methods:
    raise ValueError(f'config key methods: {report_lib.REAL!r} is reserved for the real-image '
                     'row.')
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
  w = config.get('train_workers', 1)
  if not isinstance(w, int) or isinstance(w, bool) or w < 1:
    raise ValueError(f'config key train_workers={w!r}: expected an integer >= 1.')
  if w > 1 and k != 1:
    raise ValueError(f'config key train_workers={w} trains one subject per process: it needs '
                     f'subjects_at_once=1 (got {k}).')
  if config.prompts_limit < 0:
    raise ValueError(f'config key prompts_limit={config.prompts_limit}: expected >= 0.')
  if config.seed < 0 or config.seed + config.images_per_prompt > 2 ** 32:
    raise ValueError(f'config key seed={config.seed}: seeds must lie in [0, 2**32).')
  seeds = config.get('train_seeds', ())
  if not isinstance(seeds, (tuple, list)) or not all(
      isinstance(k, int) and not isinstance(k, bool) and 0 <= k < 2 ** 31 for k in seeds):
    raise ValueError(f'config key train_seeds={seeds!r}: expected a tuple of integers in '
                     '[0, 2**31) (() = each method\'s own seed).')
  if len(set(seeds)) != len(seeds):
    raise ValueError(f'config key train_seeds={tuple(seeds)} has duplicates.')
  scorer_lib.validate_judge(config)


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


TRAIN_LOG = 'train.log'   # a worker-trained run's console output, in its run directory


def _init_train_worker(runtime_config) -> None:
  """A training worker's process-wide set-up: the parent's runtime policy
  (compile cache), no progress bars (their output goes to a log file)."""
  init = tqdm.tqdm.__init__

  def quiet_init(self, *args, **kwargs):
    kwargs['disable'] = True  # over the caller's: a log file needs no progress bars
    init(self, *args, **kwargs)

  tqdm.tqdm.__init__ = quiet_init
  from dpg_jax import cli  # pylint: disable=g-import-not-at-top
  from dpg_jax import sharding  # pylint: disable=g-import-not-at-top
  sharding.setup_runtime(runtime_config)  # before INFO: its line would reach the console
  logging.use_absl_handler()  # the main process's log format and filters
  logging.set_verbosity(logging.INFO)
  cli.quiet_logging()


def _train_in_worker(train_fn, cfg, run_dir: str) -> float:
  """Runs `train_fn(cfg, run_dir)` with the process's output in <run_dir>/train.log;
  returns its seconds."""
  os.makedirs(run_dir, exist_ok=True)
  t0 = time.perf_counter()
  with open(os.path.join(run_dir, TRAIN_LOG), 'a', encoding='utf-8') as log:
    saved = os.dup(1), os.dup(2)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
      train_fn(cfg, run_dir)
    finally:
      os.dup2(saved[0], 1)
      os.dup2(saved[1], 2)
      os.close(saved[0])
      os.close(saved[1])
  return time.perf_counter() - t0


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

  With config.train_workers = N > 1, every pending run is queued at the start
  to N training processes (spawned: `train_fn` must be a module-level
  function), which train while this process samples and scores the runs
  already finished, in the usual order; each run's output goes to
  <run_dir>/train.log.

  Returns:
    The results dict also written to <workdir>/results.json.
  """
  validate_config(config)
  if jax.process_count() > 1:
    raise NotImplementedError('dpg_jax.evaluate runs on one process (the ledger and the '
                              'images are written by a single writer).')
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  with ledger_lib.workdir_lock(workdir):
    return Evaluator(config, workdir, train_fn or _default_train_fn,
                     train_many_fn or _default_train_many_fn).run()


class Evaluator:
  """State of one `run`: the ledger, the lazily built scorer, compiled samplers."""

  def __init__(self, config, workdir: str, train_fn, train_many_fn=_default_train_many_fn):
    self.config = config
    self.workdir = workdir
    self.train_fn = train_fn
    self.train_many_fn = train_many_fn
    self.settings = ledger_lib.eval_settings(config)
    ledger_lib.check_settings(workdir, self.settings)
    self.ledger = ledger_lib.Ledger(os.path.join(workdir, ledger_lib.LEDGER))
    self.methods = list(config.methods)
    self.seeds = [config.seed + j for j in range(config.images_per_prompt)]
    self.timer = _Timer()
    self._scorer = None
    self._samplers = {}
    self._mesh = None
    self.specs, self.missing = [], []
    self.prompts, self.units = {}, []
    self.train_seeds = plan.training_seeds(config)  # [None]: each method's own seed
    # (method, subject, training seed or None) -> cfg, (hash, fields)
    self.train_configs, self.fingerprints = {}, {}
    self._pool, self._futures = None, {}  # train_workers > 1: run -> (future, run_dir, record)

  @property
  def scorer(self) -> scorer_lib.Scorer:
    # Loaded on first use: a finished evaluation only rewrites its report.
    if self._scorer is None:
      with self.timer('load_scorer'):
        self._scorer = scorer_lib.make_scorer(self.config, self.workdir)
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
    self.specs, self.missing = plan.resolve_subjects(self.config, self.workdir)
    if not self.specs:
      raise ValueError('No subject to evaluate (see the missing subjects above).')
    limit = self.config.prompts_limit or None
    self.prompts = {s.subject.name: s.subject.prompts(self.config.identifier)[:limit]
                    for s in self.specs}
    for spec in self.specs:
      for m in self.methods:
        for k in self.train_seeds:
          run = m, spec.subject.name, k
          cfg = plan.training_config(self.config, m, spec, self.workdir, seed=k)
          self.train_configs[run] = cfg
          self.fingerprints[run] = plan.training_fingerprint(cfg, self.workdir)
    self.units = [self._unit(m, s.subject.name, k, i)
                  for s in self.specs for m in self.methods for k in self.train_seeds
                  for i in range(len(self.prompts[s.subject.name]))]
    n_done = sum(u in self.ledger for u in self.units)
    logging.info('Evaluating %d subjects x %d methods x %d training seeds: %d units, %d '
                 'already done.', len(self.specs), len(self.methods), len(self.train_seeds),
                 len(self.units), n_done)
    for m in self.methods:
      for k in self.train_seeds:
        self._train_together(m, k)
    bar = tqdm.tqdm(total=len(self.units), initial=n_done, desc='eval', dynamic_ncols=True)
    try:
      self._queue_training()
      for spec in self.specs:
        self._subject(spec, bar)
        self.report()
    finally:
      bar.close()
      if self._pool is not None:
        self._stop_workers(interrupted=sys.exc_info()[0] is not None)
    results = self.report()
    logging.info('Results in %s\n%s', os.path.join(self.workdir, 'results.md'),
                 report_lib.format_table(results['overall'], self.methods + [report_lib.REAL]))
    for phase, t in results['timing'].items():
      if t['count'] and phase in ('generate', 'score'):
        logging.info('%s: %d images in %.1fs, %.2f images/s (compiles included)', phase,
                     t['count'], t['seconds'], t['per_second'])
    return results

  def _unit(self, method: str, name: str, seed: int | None, i: int) -> tuple:
    return ledger_lib.unit_key(name, method, i, self.fingerprints[method, name, seed][0], seed)

  def _subject(self, spec: plan.SubjectSpec, bar) -> None:
    subject = spec.subject
    name = subject.name
    refs = None
    for method in self.methods:
      for seed in self.train_seeds:
        todo = [i for i in range(len(self.prompts[name]))
                if self._unit(method, name, seed, i) not in self.ledger]
        grid_path = os.path.join(self.workdir, 'grids', plan.run_name(method, name, seed)
                                 + '.png')
        if todo:
          bar.set_description(f'eval {plan.run_name(method, name, seed)}')
          refs = refs or self._references(spec)
          self._method(spec, method, seed, todo, refs, bar)
        if todo or not os.path.exists(grid_path):
          report_lib.write_grid(self.workdir, self._records(name, method, seed), grid_path)
    # After the methods: a first training that fails records nothing.
    if ('real', name) not in self.ledger:
      refs = refs or self._references(spec)
      self._record({'kind': 'real', 'subject': name, 'live': subject.live,
                    'class_noun': subject.class_noun, 'num_images': len(subject.images),
                    **self.scorer.real_images(refs)})

  def _references(self, spec: plan.SubjectSpec) -> scorer_lib.References:
    subject = spec.subject
    with self.timer('score_references', len(subject.images)):
      return self.scorer.references(subject.images, attributes=spec.attributes)

  def _record(self, record: dict) -> None:
    """Appends a finished unit; the first one also fixes the workdir's settings."""
    ledger_lib.fix_settings(self.workdir, self.settings)
    self.ledger.append(record)

  def _records(self, subject: str, method: str, seed: int | None) -> list[dict]:
    fp = self.fingerprints[method, subject, seed][0]
    return [r for r in self.ledger.values() if r['kind'] == 'prompt' and r['subject'] == subject
            and r['method'] == method and r.get('train_fingerprint') == fp
            and r.get('train_seed') == seed]

  def _queue_training(self) -> None:
    """config.train_workers > 1: every run with units to do and no finished
    training is queued, in the order the subject loop needs them."""
    workers = self.config.get('train_workers', 1)
    if workers == 1:
      return
    import concurrent.futures  # pylint: disable=g-import-not-at-top
    import multiprocessing  # pylint: disable=g-import-not-at-top
    pending = []
    for spec in self.specs:
      name = spec.subject.name
      for m in self.methods:
        for k in self.train_seeds:
          if self._has_todo(m, name, k):
            run_dir, record = self._start_run(m, name, k)
            if record is not None:
              pending.append(((m, name, k), run_dir, record))
    if not pending:
      return
    runtime = ml_collections.ConfigDict({
        'compilation_cache_dir': jax.config.jax_compilation_cache_dir or 'none',
        'distributed': False})
    logging.info('Training %d runs in %d worker processes (each run logs to '
                 '<run_dir>/%s) while this one samples and scores.', len(pending), workers,
                 TRAIN_LOG)
    # spawn, not fork: this process has a running JAX runtime. Class images that
    # runs share are written atomically: two workers may both generate a set
    # (the same images), which costs time, never a torn file.
    self._pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context('spawn'),
        initializer=_init_train_worker, initargs=(runtime,))
    for run, run_dir, record in pending:
      future = self._pool.submit(_train_in_worker, self.train_fn, self.train_configs[run],
                                 run_dir)
      self._futures[run] = future, run_dir, record

  def _stop_workers(self, interrupted: bool) -> None:
    """Cancels queued runs; when this process stops early (an error, a kill), the
    runs in training get SIGTERM: each saves a checkpoint and stops (the rerun
    resumes it) instead of training to the end unattended."""
    if interrupted:
      for p in list(getattr(self._pool, '_processes', {}).values()):
        if p.is_alive():
          os.kill(p.pid, signal.SIGTERM)
    self._pool.shutdown(wait=True, cancel_futures=True)
    self._pool, self._futures = None, {}

  def _trained_run(self, cfg, method: str, name: str, seed: int | None) -> str:
    """<workdir>/runs/<method>/<subject>[/seed<k>], trained unless finished with these
    settings."""
    if (method, name, seed) in self._futures:  # queued to a training worker
      future, run_dir, record = self._futures.pop((method, name, seed))
      log = os.path.join(run_dir, TRAIN_LOG)
      with self.timer('wait_for_training', 1):
        try:
          seconds = future.result()
        except Exception as e:
          raise RuntimeError(f'Training {method} on {name} failed in its worker process: '
                             f'{type(e).__name__}: {e} (its output: {log}).') from e
      logging.info('Trained %s on %s in %.0fs (a worker; log %s)', method, name, seconds, log)
    else:
      run_dir, record = self._start_run(method, name, seed)
      if record is not None:
        logging.info('Training %s on %s into %s', method, name, run_dir)
        with self.timer('train', 1):
          self.train_fn(cfg, run_dir)
    if record is not None:
      ledger_lib.finish_run(run_dir, record, method, name)
    if not self.config.keep_checkpoints:
      # The export holds the final weights; checkpoints only serve resuming.
      shutil.rmtree(os.path.join(run_dir, 'checkpoints'), ignore_errors=True)
    return run_dir

  def _has_todo(self, method: str, name: str, seed: int | None) -> bool:
    """Whether (method, subject, seed) has a prompt unit not in the ledger."""
    return any(self._unit(method, name, seed, i) not in self.ledger
               for i in range(len(self.prompts[name])))

  def _start_run(self, method: str, name: str, seed: int | None):
    """(run_dir, None) if finished with these settings, else (run_dir, record) ready to train."""
    run_dir = os.path.join(self.workdir, 'runs', plan.run_name(method, name, seed))
    return run_dir, ledger_lib.start_run(run_dir, *self.fingerprints[method, name, seed],
                                         method, name)

  def _train_together(self, method: str, seed: int | None) -> None:
    """config.subjects_at_once > 1 (or 0 = all): the method's unfinished subjects
    (of one training seed: configs trained together differ only in data.*) are
    trained in groups of that many, each group one job on one mesh
    (dpg_jax/multisubject.py); `_trained_run` then finds them finished."""
    k = self.config.get('subjects_at_once', 1)
    if k == 1:
      return
    pending = [spec.subject.name for spec in self.specs
               if self._has_todo(method, spec.subject.name, seed)]
    runs = [(name, *self._start_run(method, name, seed)) for name in pending]
    runs = [r for r in runs if r[2] is not None]
    k = k or len(runs)
    for g in range(0, len(runs), max(k, 1)):
      group = runs[g:g + k]
      names = [name for name, _, _ in group]
      logging.info('Training %s on %d subjects at once: %s', method, len(group), ', '.join(names))
      with self.timer('train', len(group)):
        self.train_many_fn([self.train_configs[method, n, seed] for n in names],
                           [run_dir for _, run_dir, _ in group])
      for name, run_dir, record in group:
        ledger_lib.finish_run(run_dir, record, method, name)

  def _method(self, spec: plan.SubjectSpec, method: str, train_seed: int | None,
              todo: Sequence[int], refs: scorer_lib.References, bar) -> None:
    """Generates, saves, scores and records the unfinished prompts `todo`."""
    from dpg_jax import sample as sample_lib  # pylint: disable=g-import-not-at-top
    from dpg_jax import sampling  # pylint: disable=g-import-not-at-top
    config, s = self.config, self.config.sample
    subject, name = spec.subject, spec.subject.name
    prompts, seeds, ipp = self.prompts[name], self.seeds, len(self.seeds)
    run = method, name, train_seed
    cfg, fp = self.train_configs[run], self.fingerprints[run][0]
    run_dir = self._trained_run(cfg, method, name, train_seed)
    export_dir = os.path.join(run_dir, 'export')
    with self.timer('load_model'):
      sd, params, _ = sample_lib.load_trained(run_dir, cfg)
    sampler = self._sampler(sd, export_dir, s.resolution or cfg.data.resolution)
    # One folder per training fingerprint: other settings' units keep their files.
    image_dir = os.path.join('images', plan.run_name(method, name, train_seed), fp)
    seed_field = {} if train_seed is None else {'train_seed': train_seed}
    out_dir = os.path.join(self.workdir, image_dir)
    # Several prompts per sampler call fill its batch; each is recorded alone.
    per_call = max(1, s.batch_size // ipp)
    for c in range(0, len(todo), per_call):
      chunk = todo[c:c + per_call]
      with self.timer('generate', len(chunk) * ipp):
        images = sampler(params, [plan.with_identifier(prompts[i], config.identifier,
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
            'train_fingerprint': fp, **seed_field,
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
    results = report_lib.summarize(records, self.methods)
    results['settings'] = self.settings
    results['missing_subjects'] = self.missing
    results['incomplete_units'] = sum(u not in self.ledger for u in self.units)
    results['timing'] = self.timer.summary()
    report_lib.write_results(self.workdir, results)
    return results

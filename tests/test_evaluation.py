"""Tests of dpg_jax.evaluation: scorer, report, ledger, plan and the resumable driver.

Encoders are the tiny random DINO / CLIP; the driver test swaps training for a
copy of the tiny SD (train_fn), so it runs the real sampling, scoring, ledger
and report code in well under a minute.
"""
import functools
import json
import os
import shutil

import numpy as np
from PIL import Image
import pytest

from configs import eval_dreambench
from dpg_jax import encoders
from dpg_jax import evaluation
from dpg_jax import rewards
from dpg_jax import sampling
from dpg_jax.datasets import Subject
from dpg_jax.evaluation import driver
from dpg_jax.evaluation import ledger as ledger_lib
from dpg_jax.evaluation import plan
from dpg_jax.evaluation import report
from dpg_jax.evaluation import scorer as scorer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_pair_mean(a, b):
  return float(np.mean([[_unit(x) @ _unit(y) for y in b] for x in a]))


# -- metric math ----------------------------------------------------------------
def test_identical_and_orthogonal_embeddings():
  e = np.eye(4, dtype=np.float32)
  x = np.array([[3.0, 0.0, 0.0, 0.0]], np.float32)
  np.testing.assert_allclose(scorer_lib.pair_mean(x, 2 * x), 1.0, atol=1e-6)
  np.testing.assert_allclose(scorer_lib.pair_mean(e[:1], e[1:]), 0.0, atol=1e-7)
  np.testing.assert_allclose(scorer_lib.text_similarity(e[0], e), [1, 0, 0, 0], atol=1e-7)
  # Orthogonal references: every off-diagonal pair is 0 (self-pairs, 1, excluded).
  np.testing.assert_allclose(scorer_lib.self_excluded_mean(e), 0.0, atol=1e-7)
  np.testing.assert_allclose(scorer_lib.self_excluded_mean(np.ones((3, 4))), 1.0, atol=1e-6)
  assert np.isnan(scorer_lib.self_excluded_mean(e[:1]))


def test_pair_means_match_numpy():
  rng = np.random.default_rng(0)
  gen, ref = rng.normal(size=(5, 8)), rng.normal(size=(3, 8))
  per_image = [np.mean([_unit(g) @ _unit(r) for r in ref]) for g in gen]
  np.testing.assert_allclose(scorer_lib.pair_similarity(gen, ref), per_image, atol=1e-6)
  np.testing.assert_allclose(scorer_lib.pair_mean(gen, ref), _np_pair_mean(gen, ref), atol=1e-6)
  # Real-image row: ordered pairs i != j only.
  want = np.mean([_unit(ref[i]) @ _unit(ref[j]) for i in range(3) for j in range(3) if i != j])
  np.testing.assert_allclose(scorer_lib.self_excluded_mean(ref), want, atol=1e-6)
  assert abs(want - _np_pair_mean(ref, ref)) > 0.05  # self-pairs would change it
  text = rng.normal(size=8)
  np.testing.assert_allclose(scorer_lib.text_similarity(text, gen),
                             [_unit(g) @ _unit(text) for g in gen], atol=1e-6)


# -- scorer -----------------------------------------------------------------------
@pytest.fixture(scope='module')
def scorer(tmp_path_factory):
  base = tmp_path_factory.mktemp('encoders')
  dino = encoders.build_tiny_dino(str(base / 'dino'), seed=0)
  clip = encoders.build_tiny_clip(str(base / 'clip'), seed=0)
  return scorer_lib.Scorer.load(dino, clip, batch_size=4)


def _images(n, size, seed):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_scorer_batches_pad_and_compile_once(scorer):
  imgs = _images(5, 64, 0)  # 5 = one full batch of 4 + one padded
  emb = scorer.embed_images('dino', imgs)
  alone = np.concatenate([scorer.embed_images('dino', imgs[i:i + 1]) for i in range(5)])
  np.testing.assert_allclose(emb, alone, atol=1e-5)
  # Mixed sizes (reference photos): preprocessed one by one, embedded together.
  mixed = [_images(1, 96, 1)[0], _images(1, 80, 2)[0], imgs[0]]
  refs = scorer.references(mixed)
  np.testing.assert_allclose(refs.dino[2], emb[0], atol=1e-5)
  scorer.embed_texts(['a toy', 'a toy in the snow', 'x', 'y', 'z'])
  assert scorer.trace_counts == {'dino': 1, 'clip': 1, 'text': 1}


def test_scorer_numbers_and_clip_t_prompt(scorer):
  refs_imgs, gen = _images(3, 72, 3), _images(2, 64, 4)
  refs = scorer.references(refs_imgs)
  prompt = 'a sks toy in the snow'
  clip_t_prompt = rewards.strip_identifier(prompt, 'sks')
  assert clip_t_prompt == 'a toy in the snow'
  out = scorer.score(gen, clip_t_prompt, refs)
  g_dino, g_clip = scorer.embed_images('dino', gen), scorer.embed_images('clip', gen)
  text = scorer.embed_texts([clip_t_prompt])[0]
  np.testing.assert_allclose(out['dino'], _np_pair_mean(g_dino, refs.dino), atol=1e-5)
  np.testing.assert_allclose(out['clip_i'], _np_pair_mean(g_clip, refs.clip), atol=1e-5)
  np.testing.assert_allclose(out['clip_t'], np.mean(_unit(g_clip) @ _unit(text)), atol=1e-5)
  np.testing.assert_allclose(np.mean(out['per_image']['dino']), out['dino'], atol=1e-6)
  with_id = scorer.score(gen, prompt, refs)['clip_t']
  assert abs(with_id - out['clip_t']) > 1e-4  # the identifier does change the text embedding
  # Generated == references: DINO pools self-pairs, the real row excludes them.
  same = scorer.score(refs_imgs, clip_t_prompt, refs)
  real = scorer.real_images(refs)
  np.testing.assert_allclose(same['dino'], _np_pair_mean(refs.dino, refs.dino), atol=1e-5)
  n = 3
  np.testing.assert_allclose(real['dino'], (n * same['dino'] - 1) / (n - 1), atol=1e-5)
  np.testing.assert_allclose(real['clip_i'], (n * same['clip_i'] - 1) / (n - 1), atol=1e-5)


def test_scorer_per_image_scores_and_bad_input(scorer):
  gen, refs = _images(3, 64, 6), scorer.references(_images(2, 64, 7))
  out = scorer.score(gen, 'a toy', refs)
  g_dino, g_clip = scorer.embed_images('dino', gen), scorer.embed_images('clip', gen)
  text = scorer.embed_texts(['a toy'])[0]
  np.testing.assert_allclose(out['per_image']['dino'],
                             [np.mean([_unit(g) @ _unit(r) for r in refs.dino]) for g in g_dino],
                             atol=1e-5)
  np.testing.assert_allclose(out['per_image']['clip_t'], _unit(g_clip) @ _unit(text), atol=1e-5)
  # A single photo has no pair: no real-image row (None, not NaN, in the ledger).
  assert scorer.real_images(scorer.references(_images(1, 64, 8))) == {'dino': None,
                                                                      'clip_i': None}
  with pytest.raises(ValueError, match="kind='sam': expected dino or clip"):
    scorer.embed_images('sam', gen)
  with pytest.raises(ValueError, match='got no images'):
    scorer.embed_images('dino', [])
  with pytest.raises(ValueError, match='config key scorer.batch_size=0: expected >= 1'):
    scorer_lib.Scorer(scorer.dino, None, scorer.clip, None, batch_size=0)


def test_make_scorer_builds_the_tiny_encoders_in_the_workdir(tmp_path, scorer):
  config = _driver_config()
  config.seed = 0  # the fixture's encoders
  built = scorer_lib.make_scorer(config, str(tmp_path))
  assert built.batch_size == 4
  assert (tmp_path / 'tiny_encoders' / 'dino').is_dir()
  assert (tmp_path / 'tiny_encoders' / 'clip').is_dir()
  imgs = _images(2, 64, 9)
  np.testing.assert_allclose(built.embed_images('dino', imgs), scorer.embed_images('dino', imgs),
                             atol=1e-6)


# -- aggregation and reports --------------------------------------------------------
def _prompt(subject, method, i, live, dino, clip_i, clip_t, n=2):
  return {'kind': 'prompt', 'subject': subject, 'method': method, 'prompt_index': i,
          'live': live, 'dino': dino, 'clip_i': clip_i, 'clip_t': clip_t, 'num_images': n}


def _real(subject, live, dino, clip_i):
  return {'kind': 'real', 'subject': subject, 'live': live, 'dino': dino, 'clip_i': clip_i,
          'num_images': 4}


RECORDS = [
    _prompt('dog', 'a', 0, True, 0.5, 0.6, 0.2),
    _prompt('dog', 'a', 1, True, 0.7, 0.8, 0.4),
    _prompt('dog', 'b', 0, True, 0.1, 0.2, 0.3),
    _prompt('cat', 'a', 0, True, 0.2, 0.2, 0.2),
    _prompt('can', 'a', 0, False, 0.9, 0.9, 0.1),
    _real('dog', True, 0.8, 0.9),
    _real('cat', True, 0.6, 0.7),
    _real('can', False, 0.5, 0.5),
]


def test_summarize_groups():
  r = report.summarize(RECORDS, ['a', 'b'])
  assert r['subjects'] == ['can', 'cat', 'dog'] and r['live_subjects'] == ['cat', 'dog']
  dog = r['per_subject']['dog']
  np.testing.assert_allclose([dog['a'][k] for k in scorer_lib.METRICS], [0.6, 0.7, 0.3])
  assert dog['a']['num_prompts'] == 2 and dog['a']['num_images'] == 4
  assert dog[report.REAL] == {'dino': 0.8, 'clip_i': 0.9, 'clip_t': None, 'num_images': 4}
  live, obj, overall = r['groups']['live'], r['groups']['object'], r['overall']
  np.testing.assert_allclose([live['a'][k] for k in scorer_lib.METRICS], [0.4, 0.45, 0.25])
  np.testing.assert_allclose([obj['a'][k] for k in scorer_lib.METRICS], [0.9, 0.9, 0.1])
  # Overall = mean over subjects (not over prompts).
  np.testing.assert_allclose([overall['a'][k] for k in scorer_lib.METRICS],
                             [(0.6 + 0.2 + 0.9) / 3, (0.7 + 0.2 + 0.9) / 3, (0.3 + 0.2 + 0.1) / 3])
  assert overall['a']['num_subjects'] == 3 and overall['b']['num_subjects'] == 1
  # Standard error over subjects: sample std / sqrt(n); none from one subject.
  np.testing.assert_allclose(overall['a']['dino_se'],
                             np.std([0.6, 0.2, 0.9], ddof=1) / np.sqrt(3))
  np.testing.assert_allclose(live['a']['clip_t_se'], 0.05)
  assert overall['b']['dino_se'] is None and obj['a']['clip_i_se'] is None
  assert overall[report.REAL]['clip_t_se'] is None
  np.testing.assert_allclose([overall[report.REAL]['dino'], overall[report.REAL]['clip_i']],
                             [(0.8 + 0.6 + 0.5) / 3, (0.9 + 0.7 + 0.5) / 3])
  assert overall[report.REAL]['clip_t'] is None
  assert 'b' not in obj
  assert len(r['per_prompt']) == 5


def test_subject_mean_weights_prompts_by_images():
  recs = [_prompt('dog', 'a', 0, True, 0.0, 0.0, 0.0, n=1),
          _prompt('dog', 'a', 1, True, 1.0, 1.0, 1.0, n=3)]
  row = report.summarize(recs)['per_subject']['dog']['a']
  assert row['dino'] == pytest.approx(0.75)


def test_format_table_exact():
  rows = {'b': {'dino': 0.1234, 'clip_i': 0.5, 'clip_t': 0.2996},
          report.REAL: {'dino': 0.774, 'clip_i': 0.885, 'clip_t': None},
          'a': {'dino': 0.6945, 'clip_i': 0.762, 'clip_t': 0.282}}
  assert report.format_table(rows, ['a', 'b', report.REAL, 'missing']) == (
      '| Method | DINO | CLIP-I | CLIP-T |\n'
      '|---|---|---|---|\n'
      '| a | 0.695 | 0.762 | 0.282 |\n'
      '| b | 0.123 | 0.500 | 0.300 |\n'
      '| Real images | 0.774 | 0.885 | N/A |\n')


def test_results_markdown_exact():
  r = report.summarize([RECORDS[4], RECORDS[7]], ['a'])
  r['settings'] = {'images_per_prompt': 2, 'seed': 0, 'dino_model': 'D', 'clip_model': 'C'}
  r['missing_subjects'] = ['dog']
  assert report.results_markdown(r) == '\n'.join([
      '# DreamBench evaluation', '',
      '1 subjects (0 live, 1 objects), 2 images per prompt, seeds from 0; DINO: D, CLIP: C. '
      'Raw cosine similarities.', '',
      'Missing subjects (not evaluated): dog.', '',
      '## Overall (mean over subjects)', '',
      '| Method | DINO | CLIP-I | CLIP-T |\n|---|---|---|---|\n'
      '| a | 0.900 | 0.900 | 0.100 |\n| Real images | 0.500 | 0.500 | N/A |\n',
      '## Objects', '',
      '| Method | DINO | CLIP-I | CLIP-T |\n|---|---|---|---|\n'
      '| a | 0.900 | 0.900 | 0.100 |\n| Real images | 0.500 | 0.500 | N/A |\n',
      '## Per subject', '',
      '### can (object)', '',
      '| Method | DINO | CLIP-I | CLIP-T |\n|---|---|---|---|\n'
      '| a | 0.900 | 0.900 | 0.100 |\n| Real images | 0.500 | 0.500 | N/A |\n'])


def test_report_files_from_a_hand_made_ledger(tmp_path):
  """ledger.jsonl written by hand -> results.json and the exact Table 1 layout of results.md."""
  with open(tmp_path / ledger_lib.LEDGER, 'w') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in RECORDS))
  results = report.summarize(ledger_lib.Ledger(str(tmp_path / ledger_lib.LEDGER)).values(),
                             ['a', 'b'])
  results['incomplete_units'] = 1
  report.write_results(str(tmp_path), results)
  with open(tmp_path / 'results.json') as f:
    assert json.load(f) == results
  head = '| Method | DINO | CLIP-I | CLIP-T |\n|---|---|---|---|\n'
  assert (tmp_path / 'results.md').read_text() == '\n'.join([
      '# DreamBench evaluation', '',
      '**Incomplete**: 1 (subject, method, prompt) units not finished.', '',
      '## Overall (mean over subjects)', '',
      head + '| a | 0.567 ± 0.203 | 0.600 ± 0.208 | 0.200 ± 0.058 |\n'
      '| b | 0.100 | 0.200 | 0.300 |\n'
      '| Real images | 0.633 ± 0.088 | 0.700 ± 0.115 | N/A |\n',
      '## Live subjects', '',
      head + '| a | 0.400 ± 0.200 | 0.450 ± 0.250 | 0.250 ± 0.050 |\n'
      '| b | 0.100 | 0.200 | 0.300 |\n'
      '| Real images | 0.700 ± 0.100 | 0.800 ± 0.100 | N/A |\n',
      '## Objects', '',
      head + '| a | 0.900 | 0.900 | 0.100 |\n| Real images | 0.500 | 0.500 | N/A |\n',
      '## Per subject', '',
      '### can (object)', '',
      head + '| a | 0.900 | 0.900 | 0.100 |\n| Real images | 0.500 | 0.500 | N/A |\n',
      '### cat (live)', '',
      head + '| a | 0.200 | 0.200 | 0.200 |\n| Real images | 0.600 | 0.700 | N/A |\n',
      '### dog (live)', '',
      head + '| a | 0.600 | 0.700 | 0.300 |\n| b | 0.100 | 0.200 | 0.300 |\n'
      '| Real images | 0.800 | 0.900 | N/A |\n'])


def test_subject_without_a_photo_pair_is_left_out_of_the_real_row_mean():
  r = report.summarize([_real('dog', True, 0.8, 0.9), _real('cat', True, None, None),
                        _prompt('cat', 'a', 0, True, 0.3, 0.4, 0.5)], ['a'])
  real = r['overall'][report.REAL]
  assert (real['dino'], real['clip_i'], real['clip_t']) == (0.8, 0.9, None)
  assert r['overall']['a']['dino'] == 0.3 and r['overall']['a']['num_subjects'] == 1
  assert report.format_table(r['per_subject']['cat'], ['a', report.REAL]).endswith(
      '| a | 0.300 | 0.400 | 0.500 |\n| Real images | N/A | N/A | N/A |\n')


def test_grid_rows_are_prompts_and_columns_seeds(tmp_path):
  colours = {'p0_s0.png': (255, 0, 0), 'p0_s1.png': (0, 255, 0), 'p1_s0.png': (0, 0, 255)}
  sampling.save_images(np.stack([np.full((8, 8, 3), c, np.uint8) for c in colours.values()]),
                       str(tmp_path), names=list(colours))
  records = [{'prompt_index': 1, 'files': ['p1_s0.png']},   # one seed short
             {'prompt_index': 0, 'files': ['p0_s0.png', 'p0_s1.png']}]
  path = report.write_grid(str(tmp_path), records, str(tmp_path / 'grids' / 'm' / 's.png'))
  grid = np.asarray(Image.open(path).convert('RGB'))
  assert grid.shape == (16, 16, 3)
  cells = {(r, c): tuple(grid[8 * r, 8 * c]) for r in range(2) for c in range(2)}
  assert cells == {(0, 0): (255, 0, 0), (0, 1): (0, 255, 0), (1, 0): (0, 0, 255),
                   (1, 1): (0, 0, 0)}
  assert report.write_grid(str(tmp_path), [], str(tmp_path / 'none.png')) is None
  assert not (tmp_path / 'none.png').exists()


# -- ledger, subjects, configs --------------------------------------------------------
def test_ledger_drops_torn_and_duplicate_lines(tmp_path):
  path = str(tmp_path / 'ledger.jsonl')
  ledger = ledger_lib.Ledger(path)
  ledger.append(RECORDS[0])
  ledger.append(RECORDS[5])
  with pytest.raises(ValueError, match='already in the ledger'):
    ledger.append(RECORDS[0])
  with open(path, 'a') as f:
    f.write(json.dumps(RECORDS[0]) + '\n')   # a duplicate
    f.write(json.dumps(RECORDS[1])[:-7])      # killed mid-write
  ledger = ledger_lib.Ledger(path)
  assert sorted(ledger.records) == [('prompt', 'dog', 'a', 0, None), ('real', 'dog')]
  with open(path) as f:
    assert len(f.read().splitlines()) == 2    # repaired on disk
  ledger.append(RECORDS[1])
  assert len(ledger_lib.Ledger(path)) == 3


def test_settings_are_fixed_by_the_first_unit(tmp_path):
  workdir, config = str(tmp_path), _driver_config()
  settings = ledger_lib.eval_settings(config)
  ledger_lib.check_settings(workdir, {'any': 'thing'})   # no unit yet: anything goes
  ledger_lib.fix_settings(workdir, settings)
  ledger_lib.fix_settings(workdir, {'other': 1})         # written once only
  ledger_lib.check_settings(workdir, settings)
  config.images_per_prompt = 3
  with pytest.raises(ValueError, match=r'other settings \(images_per_prompt: 2 -> 3\)'):
    ledger_lib.check_settings(workdir, ledger_lib.eval_settings(config))


def test_run_dir_is_resumed_reused_or_retrained(tmp_path, caplog):
  run_dir = str(tmp_path / 'runs' / 'm' / 's')
  attempt = os.path.join(run_dir, ledger_lib.TRAIN_ATTEMPT)
  record = ledger_lib.start_run(run_dir, 'fp1', {'learning_rate': 1e-4}, 'm', 's')
  assert json.loads(record) == {'fingerprint': 'fp1', 'config': {'learning_rate': 1e-4}}
  with open(os.path.join(run_dir, 'partial.txt'), 'w') as f:
    f.write('x')
  # A stopped attempt with the same settings is kept: training resumes it.
  assert ledger_lib.start_run(run_dir, 'fp1', {'learning_rate': 1e-4}, 'm', 's') == record
  assert os.path.isfile(os.path.join(run_dir, 'partial.txt')) and os.path.isfile(attempt)
  with pytest.raises(RuntimeError, match='Training m on s left no pipeline'):
    ledger_lib.finish_run(run_dir, record, 'm', 's')
  os.makedirs(os.path.join(run_dir, 'export'))
  with open(os.path.join(run_dir, 'export', 'model_index.json'), 'w') as f:
    f.write('{}')
  ledger_lib.finish_run(run_dir, record, 'm', 's')
  assert not os.path.exists(attempt)
  with open(os.path.join(run_dir, ledger_lib.TRAIN_FINGERPRINT)) as f:
    assert f.read() == record
  assert ledger_lib.start_run(run_dir, 'fp1', {'learning_rate': 1e-4}, 'm', 's') is None
  # Other training settings: the run is deleted and trained anew.
  with caplog.at_level('WARNING'):
    assert ledger_lib.start_run(run_dir, 'fp2', {'learning_rate': 3e-4}, 'm', 's') is not None
  assert 'other training settings (learning_rate: 0.0001 -> 0.0003)' in caplog.text
  assert os.listdir(run_dir) == [ledger_lib.TRAIN_ATTEMPT]


def test_select_subjects():
  bench = ('a', 'b', 'c')
  assert plan.select_subjects((), ['c', 'a'], bench) == (['a', 'c'], ['b'])
  assert plan.select_subjects(('c',), ['c', 'a'], bench) == (['c'], [])
  with pytest.raises(ValueError, match=r"\['b'\] not available"):
    plan.select_subjects(('b',), ['c', 'a'], bench)
  assert plan.select_subjects((), ['x'], ()) == (['x'], [])


def _subject_spec(tmp_path):
  subject = Subject(name='thing', class_noun='toy', live=False, images=(_images(1, 64, 0)[0],),
                    prompt_templates=('a {} in the snow',))
  return plan.SubjectSpec(subject, {'instance_dir': str(tmp_path / 'photos')})


def test_eval_configs_and_training_configs(tmp_path):
  from dpg_jax import train  # pylint: disable=g-import-not-at-top
  spec = _subject_spec(tmp_path)
  for name in ('eval_dreambench', 'eval_tiny', 'eval_toy'):
    config = plan.load_config_file(f'configs/{name}.py')
    evaluation.validate_config(config)
    for method in config.method_configs:
      cfg = plan.training_config(config, method, spec, str(tmp_path))
      train.validate_config(cfg)
      assert cfg.data.instance_dir == str(tmp_path / 'photos') and not cfg.data.subject
      assert cfg.data.class_noun == 'toy' and cfg.export and cfg.sample_every == 0
  tiny = plan.load_config_file('configs/eval_tiny.py')
  a, b = (plan.training_config(tiny, m, spec, str(tmp_path)) for m in ('tiny', 'tiny_dpg'))
  assert a.num_steps == b.num_steps == 30
  assert a.model.pretrained == b.model.pretrained == 'toyworld'   # the shipped toy base
  assert a.data.class_dir == b.data.class_dir != ''  # one set of class images
  assert b.dpg.enabled and not a.dpg.enabled
  # A tiny random base (model.tiny) is built once for all runs, not per run directory.
  random_tiny = tmp_path / 'random_tiny.py'
  random_tiny.write_text('from configs import tiny\n'
                         'def get_config():\n'
                         '  c = tiny.get_config()\n'
                         "  c.model.pretrained, c.model.tiny = '', 'tiny'\n"
                         '  return c\n')
  tiny.method_configs.random_tiny = str(random_tiny)
  r = plan.training_config(tiny, 'random_tiny', spec, str(tmp_path))
  assert r.model.pretrained == str(tmp_path / 'pretrained' / 'tiny_tiny_seed0')
  # Training seeds: `seed` overridden, the same base, class images of their own.
  r5 = plan.training_config(tiny, 'random_tiny', spec, str(tmp_path), seed=5)
  assert r5.seed == 5 and r5.model.pretrained == r.model.pretrained
  assert r5.data.class_dir != r.data.class_dir
  toy = plan.load_config_file('configs/eval_toy.py')
  assert toy.train_seeds == (0, 1, 2) and toy.scorer.judge == 'toyworld'
  dino, clip_t = (plan.training_config(toy, m, spec, str(tmp_path), seed=1)
                  for m in ('toy_dpg_dino', 'toy_dpg_clip_t'))
  assert (dino.dpg.rewards, clip_t.dpg.rewards) == ('dino:1.0', 'clip_text:1.0')
  assert dino.dpg.dino_model == clip_t.dpg.clip_model == 'toyworld' and dino.seed == 1
  assert dino.dpg.instance_mse_weight == clip_t.dpg.instance_mse_weight == 1.0
  # Variants: a config file plus the method's own overrides, on top of which `train` applies.
  tune = plan.load_config_file('configs/eval_toy.py:tune')
  assert set(tune.subjects).isdisjoint(plan.load_config_file('configs/eval_toy.py:heldout').subjects)
  zm, emb = (plan.training_config(tune, m, spec, str(tmp_path))
             for m in ('toy_dpg_dino_zero_mean', 'toy_dpg_dino_embedding'))
  assert (zm.dpg.critic.init, zm.dpg.critic.arch) == ('zero_mean', 'fully_conv')
  assert (emb.dpg.critic.init, emb.dpg.critic.arch) == ('authors', 'embedding')
  assert zm.dpg.rewards == 'dino:1.0' and zm.num_steps == 400
  # A method's override wins over `train` (the base row: 0 of the table's 400 steps).
  assert plan.training_config(toy, 'toy_base', spec, str(tmp_path)).num_steps == 0
  tune.method_overrides.toy_dpg_dino_zero_mean = {'dpg': {'critic': {'nit': 'zero_mean'}}}
  with pytest.raises(KeyError, match=r'method_overrides\.toy_dpg_dino_zero_mean\.dpg\.critic\.nit'):
    plan.training_config(tune, 'toy_dpg_dino_zero_mean', spec, str(tmp_path))
  full = plan.load_config_file('configs/eval_dreambench.py')
  assert plan.training_config(full, 'dreambooth', spec, str(tmp_path)).num_steps == 1000
  full.train.unknown_key = 1
  with pytest.raises(KeyError, match='train.unknown_key'):
    plan.training_config(full, 'dreambooth', spec, str(tmp_path))


# -- the driver -----------------------------------------------------------------------
def _driver_config():
  c = eval_dreambench.get_config()
  c.methods = ('tiny',)
  c.synthetic_subjects = 2
  c.prompts_limit = 2
  c.images_per_prompt = 2
  c.sample.scheduler = 'ddim'
  c.sample.num_inference_steps = 2
  c.sample.guidance_scale = 1.0
  c.sample.batch_size = 2          # one prompt per sampler call
  c.scorer.tiny = True
  c.scorer.batch_size = 4
  return c


class _Killed(Exception):
  pass


def _np_self_excluded(e):
  n = len(e)
  return float(np.mean([_unit(e[i]) @ _unit(e[j]) for i in range(n) for j in range(n) if i != j]))


def test_driver_resumes_without_duplicates_or_recompute(tmp_path, tiny_sd_dir, monkeypatch,
                                                        scorer):
  monkeypatch.setattr(scorer_lib, 'make_scorer', lambda config, workdir: scorer)
  workdir = str(tmp_path / 'eval')
  calls = {'train': [], 'sample': 0, 'score': 0, 'kill_at': 3}

  def train_fn(cfg, run_dir):
    calls['train'].append((cfg.data.instance_dir, run_dir))
    shutil.copytree(tiny_sd_dir, os.path.join(run_dir, 'export'))

  sampler_call = sampling.Sampler.__call__
  score = scorer_lib.Scorer.score

  def counting_sampler(self, *args, **kwargs):
    calls['sample'] += 1
    if calls['sample'] == calls['kill_at']:
      raise _Killed()
    return sampler_call(self, *args, **kwargs)

  def counting_score(self, *args, **kwargs):
    calls['score'] += 1
    return score(self, *args, **kwargs)

  monkeypatch.setattr(sampling.Sampler, '__call__', counting_sampler)
  monkeypatch.setattr(scorer_lib.Scorer, 'score', counting_score)
  config = _driver_config()

  # Killed while generating the 3rd unit (synthetic1, prompt 0).
  with pytest.raises(_Killed):
    evaluation.run(config, workdir, train_fn=train_fn)
  assert calls['sample'] == 3 and calls['score'] == 2 and len(calls['train']) == 2
  with open(os.path.join(workdir, ledger_lib.LEDGER)) as f:
    first = f.read()
  # A subject's real-image row follows its methods' units.
  assert [json.loads(l)['kind'] for l in first.splitlines()] == ['prompt', 'prompt', 'real']

  calls.update(sample=0, score=0, kill_at=-1)
  results = evaluation.run(config, workdir, train_fn=train_fn)
  assert calls['sample'] == 2 and calls['score'] == 2  # only the 2 missing units
  assert len(calls['train']) == 2                        # the killed run's export is reused
  with open(os.path.join(workdir, ledger_lib.LEDGER)) as f:
    second = f.read()
  assert second.startswith(first)
  keys = [ledger_lib.record_key(json.loads(l)) for l in second.splitlines()]
  assert len(keys) == len(set(keys)) == 6
  fps = {s: json.load(open(os.path.join(workdir, 'runs', 'tiny', s,
                                         ledger_lib.TRAIN_FINGERPRINT)))['fingerprint']
         for s in ('synthetic0', 'synthetic1')}
  assert sorted(k for k in keys if k[0] == 'prompt') == [
      ('prompt', s, 'tiny', i, fps[s]) for s in ('synthetic0', 'synthetic1') for i in (0, 1)]

  assert results['incomplete_units'] == 0 and results['missing_subjects'] == []
  assert [(r['subject'], r['prompt_index']) for r in results['per_prompt']] == [
      ('synthetic0', 0), ('synthetic0', 1), ('synthetic1', 0), ('synthetic1', 1)]
  for r in results['per_prompt']:
    assert 'sks' in r['prompt'] and r['clip_t_prompt'] == r['prompt'].replace('sks ', '')
    assert r['seeds'] == [23, 24] and len(r['per_image']['dino']) == 2  # the default protocol
    for f in r['files']:
      assert os.path.isfile(os.path.join(workdir, f))
  for s in ('synthetic0', 'synthetic1'):
    row = results['per_subject'][s]
    recs = [r for r in results['per_prompt'] if r['subject'] == s]
    assert row['tiny']['dino'] == pytest.approx(np.mean([r['dino'] for r in recs]))
    photos = Subject.from_folder(os.path.join(workdir, 'subjects', s), 'toy').images
    refs = scorer.references(photos)
    assert row[report.REAL]['dino'] == pytest.approx(_np_self_excluded(refs.dino), abs=1e-5)
    assert row[report.REAL]['clip_i'] == pytest.approx(_np_self_excluded(refs.clip), abs=1e-5)
    assert row[report.REAL]['num_images'] == len(photos) == 5
    assert os.path.isfile(os.path.join(workdir, 'grids', 'tiny', f'{s}.png'))
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['overall'] == results['overall']
  with open(os.path.join(workdir, 'results.md')) as f:
    assert '| tiny |' in f.read()

  # Same images for the same seeds: rerunning a unit would reproduce it.
  calls.update(sample=0, score=0)
  evaluation.run(config, workdir, train_fn=train_fn)
  assert calls['sample'] == calls['score'] == 0 and len(calls['train']) == 2

  # Other sampling settings would make units incomparable: refused.
  config.sample.num_inference_steps = 3
  with pytest.raises(ValueError, match='other settings'):
    evaluation.run(config, workdir, train_fn=train_fn)


def _copy_tiny_sd_in_a_worker(tiny_sd_dir, cfg, run_dir):
  """A module-level train_fn (a spawned worker unpickles it): records its process."""
  print(f'training {cfg.data.instance_dir}')  # to <run_dir>/train.log
  if 'synthetic1' in run_dir and os.environ.get('DPG_TEST_FAIL_SECOND'):
    raise ValueError('the second run fails')
  shutil.copytree(tiny_sd_dir, os.path.join(run_dir, 'export'))
  with open(os.path.join(run_dir, 'pid.txt'), 'w') as f:
    f.write(str(os.getpid()))


def test_driver_trains_in_worker_processes_and_resumes(tmp_path, tiny_sd_dir, monkeypatch,
                                                       scorer):
  monkeypatch.setattr(scorer_lib, 'make_scorer', lambda config, workdir: scorer)
  config = _driver_config()
  config.train_workers = 2
  workdir = tmp_path / 'eval'
  train_fn = functools.partial(_copy_tiny_sd_in_a_worker, tiny_sd_dir)
  results = evaluation.run(config, str(workdir), train_fn=train_fn)
  runs = [workdir / 'runs' / 'tiny' / f'synthetic{i}' for i in range(2)]
  pids = {int((r / 'pid.txt').read_text()) for r in runs}
  assert os.getpid() not in pids and len(pids) <= 2
  assert all('training ' in (r / driver.TRAIN_LOG).read_text() for r in runs)
  assert results['overall']['tiny']['num_subjects'] == 2
  ledger = (workdir / ledger_lib.LEDGER).read_text()
  # A rerun trains nothing and adds no unit.
  for r in runs:
    (r / 'pid.txt').unlink()
  evaluation.run(config, str(workdir), train_fn=train_fn)
  assert not any((r / 'pid.txt').exists() for r in runs)
  assert (workdir / ledger_lib.LEDGER).read_text() == ledger
  # A worker's failure stops the evaluation naming the run and its log.
  monkeypatch.setenv('DPG_TEST_FAIL_SECOND', '1')
  with pytest.raises(RuntimeError, match=r'tiny on synthetic1 failed.*the second run fails'
                                         r'.*synthetic1/train\.log'):
    evaluation.run(config, str(tmp_path / 'eval2'), train_fn=train_fn)
  with pytest.raises(ValueError, match='config key train_workers=0'):
    config.train_workers = 0
    evaluation.validate_config(config)


@pytest.mark.slow
def test_driver_trains_tiny_end_to_end(tmp_path):
  """Real training (2 steps) + sampling + scoring for one synthetic subject."""
  config = _driver_config()
  config.synthetic_subjects = 1
  config.prompts_limit = 1
  config.train.num_steps = 2
  config.train.checkpoint_every = 2
  results = evaluation.run(config, str(tmp_path / 'eval'))
  run_dir = tmp_path / 'eval' / 'runs' / 'tiny' / 'synthetic0'
  assert (run_dir / 'export' / 'model_index.json').is_file()
  assert not (run_dir / 'checkpoints').exists()  # keep_checkpoints=False
  assert results['overall']['tiny']['num_subjects'] == 1
  assert all(np.isfinite(results['overall']['tiny'][k]) for k in scorer_lib.METRICS)


def test_eval_protocol_presets():
  authors = plan.load_config_file('configs/eval_dreambench.py')  # the default
  assert authors.to_dict() == plan.load_config_file(
      'configs/eval_dreambench.py:dpg').to_dict()
  s = authors.sample
  assert (s.scheduler, s.num_inference_steps, s.guidance_scale) == ('pndm', 200, 7.5)
  assert authors.images_per_prompt == 8 and authors.seed == 23
  assert ledger_lib.eval_settings(authors)['seed'] == 23
  db = plan.load_config_file('configs/eval_dreambench.py:dreambooth')
  assert db.images_per_prompt == 4 and db.seed == 0
  assert (db.sample.scheduler, db.sample.num_inference_steps) == ('pndm', 50)
  with pytest.raises(ValueError, match='eval_dreambench.py:imagen: unknown protocol'):
    plan.load_config_file('configs/eval_dreambench.py:imagen')


def test_training_fingerprint_ignores_only_result_neutral_keys(tmp_path):
  spec = _subject_spec(tmp_path)
  config = _driver_config()
  cfg = plan.training_config(config, 'tiny', spec, str(tmp_path))
  fp, fields = plan.training_fingerprint(cfg, str(tmp_path))
  assert fields['learning_rate'] == cfg.learning_rate and 'log_every' not in fields
  assert fields['data.instance_dir'] == '$WORKDIR/photos'   # workdir-relative
  assert not any(k.startswith(('mesh.', 'sample.prompts')) for k in fields)
  assert fields['sample.scheduler'] == cfg.sample.scheduler  # class images use it

  def fingerprint(**changes):
    c = plan.training_config(config, 'tiny', spec, str(tmp_path))
    for key, value in changes.items():
      node, *path = key.split('.')
      target = c[node] if path else c
      target[path[0] if path else node] = value
    return plan.training_fingerprint(c, str(tmp_path))[0]

  assert fingerprint() == fp
  for neutral in [{'log_every': 3}, {'checkpoint_every': 7}, {'sample.num_inference_steps': 9},
                  {'model.remat': True}, {'mesh.data': 1}]:
    assert fingerprint(**neutral) == fp, neutral
  for relevant in [{'learning_rate': 3e-4}, {'num_steps': 31}, {'seed': 1},
                   {'sample.scheduler': 'pndm'}, {'data.class_noun': 'dog'}]:
    assert fingerprint(**relevant) != fp, relevant
  # The same evaluation moved elsewhere: the same fingerprint.
  moved = plan.SubjectSpec(spec.subject, {'instance_dir': str(tmp_path / 'b' / 'photos')})
  c = plan.training_config(config, 'tiny', moved, str(tmp_path / 'b'))
  assert plan.training_fingerprint(c, str(tmp_path / 'b'))[0] == fp


def test_failed_start_locks_nothing_and_changed_training_retrains(tmp_path, tiny_sd_dir,
                                                                  monkeypatch, scorer, caplog):
  monkeypatch.setattr(scorer_lib, 'make_scorer', lambda config, workdir: scorer)
  workdir = str(tmp_path / 'eval')
  run_dir = os.path.join(workdir, 'runs', 'tiny', 'synthetic0')
  calls = {'train': [], 'fail': True}

  def train_fn(cfg, run):
    calls['train'].append(cfg.learning_rate)
    if calls['fail']:  # dies mid-training, leaving a partial run
      with open(os.path.join(run, 'partial.txt'), 'a') as f:
        f.write('x')
      raise _Killed()
    shutil.copytree(tiny_sd_dir, os.path.join(run, 'export'))

  config = _driver_config()
  config.synthetic_subjects = 1
  config.prompts_limit = 1
  config.train.learning_rate = 1e-4
  for _ in range(2):  # the same settings twice: the stopped attempt is resumed
    with pytest.raises(_Killed):
      evaluation.run(config, workdir, train_fn=train_fn)
  assert calls['train'] == [1e-4, 1e-4]
  with open(os.path.join(run_dir, 'partial.txt')) as f:
    assert f.read() == 'xx'
  assert not os.path.exists(os.path.join(run_dir, ledger_lib.TRAIN_FINGERPRINT))
  assert not os.path.exists(os.path.join(workdir, ledger_lib.SETTINGS))
  assert not os.path.exists(os.path.join(workdir, ledger_lib.LEDGER))

  # Other sampling and training settings after the failed start: accepted,
  # and the partial run of the old training settings is not resumed.
  calls['fail'] = False
  config.sample.num_inference_steps = 1
  config.train.learning_rate = 3e-4
  with caplog.at_level('WARNING'):
    first = evaluation.run(config, workdir, train_fn=train_fn)
  assert calls['train'][2:] == [3e-4]
  assert not os.path.exists(os.path.join(run_dir, 'partial.txt'))
  assert 'learning_rate: 0.0001 -> 0.0003' in caplog.text
  with open(os.path.join(run_dir, ledger_lib.TRAIN_FINGERPRINT)) as f:
    done = json.load(f)
  assert done['config']['learning_rate'] == 3e-4
  assert [r['train_fingerprint'] for r in first['per_prompt']] == [done['fingerprint']]
  assert not os.path.exists(os.path.join(run_dir, ledger_lib.TRAIN_ATTEMPT))

  # A result-neutral change reuses the run and its units.
  config.train.checkpoint_every = 7
  assert evaluation.run(config, workdir, train_fn=train_fn)['per_prompt'] == first['per_prompt']
  assert len(calls['train']) == 3

  # A training setting changed: retrained, and its old units are not reused.
  config.train.learning_rate = 2e-4
  second = evaluation.run(config, workdir, train_fn=train_fn)
  assert calls['train'][3:] == [2e-4]
  new_fp = second['per_prompt'][0]['train_fingerprint']
  assert len(second['per_prompt']) == 1 and new_fp != done['fingerprint']
  ledger = ledger_lib.Ledger(os.path.join(workdir, ledger_lib.LEDGER))
  prompt_fps = [r['train_fingerprint'] for r in ledger.values() if r['kind'] == 'prompt']
  assert prompt_fps == [done['fingerprint'], new_fp]   # the old unit stays, unreported
  # Each unit keeps its own images (same tiny SD here, so equal pixels, other files).
  old_files, new_files = first['per_prompt'][0]['files'], second['per_prompt'][0]['files']
  assert set(old_files).isdisjoint(new_files)
  assert all(os.path.isfile(os.path.join(workdir, f)) for f in old_files + new_files)



# -- training seeds -------------------------------------------------------------------
def _seeded(subject, method, seed, i, dino, context):
  """A prompt record of training seed `seed` (None: the method's own) with judge
  metrics: judge_subject = 1 - dino, judge_context as given."""
  r = _prompt(subject, method, i, False, dino, 0.5, dino / 2)
  r.update(judge_subject=1 - dino, judge_context=context)
  return r if seed is None else dict(r, train_seed=seed)


# (subject, seed, prompt) -> (dino, judge_context) of method 'a'.
SEEDED = {('x', 0, 0): (0.2, 1.0), ('x', 0, 1): (0.4, None),
          ('x', 1, 0): (0.6, 0.5), ('x', 1, 1): (0.8, None),
          ('y', 0, 0): (0.1, 0.0), ('y', 1, 0): (0.5, 1.0)}
SEEDED_RECORDS = [_seeded(s, 'a', k, i, d, c) for (s, k, i), (d, c) in SEEDED.items()] + [
    _seeded('x', 'b', None, 0, 0.3, 1.0), _seeded('y', 'b', None, 0, 0.5, 0.0),
    dict(_real('x', False, 0.9, 0.95), judge_subject=0.85),
    dict(_real('y', False, 0.7, 0.75), judge_subject=0.65)]


def test_summarize_pools_seeds_and_reports_both_standard_errors():
  r = report.summarize(SEEDED_RECORDS, ['a', 'b'])
  assert r['metrics'] == ['dino', 'clip_i', 'clip_t', 'judge_subject', 'judge_context']
  x, y = r['per_subject']['x']['a'], r['per_subject']['y']['a']
  # A subject pools its seeds: x = mean(0.2, 0.4, 0.6, 0.8), y = mean(0.1, 0.5).
  assert (x['dino'], y['dino']) == (pytest.approx(0.5), pytest.approx(0.3))
  assert x['num_images'] == 8 and x['num_prompts'] == 4
  assert x['per_seed']['0']['dino'] == pytest.approx(0.3)
  assert x['per_seed']['1']['dino'] == pytest.approx(0.7)
  # Prompts naming no context are left out of judge_context: x = mean(1.0, 0.5).
  assert x['judge_context'] == pytest.approx(0.75) and y['judge_context'] == pytest.approx(0.5)
  a = r['overall']['a']
  assert a['dino'] == pytest.approx(0.4) and a['num_subjects'] == 2 and a['num_seeds'] == 2
  # Over subjects: std(0.5, 0.3) / sqrt(2) = 0.1. Over seeds: the subject-averaged
  # per-seed means are (0.3 + 0.1) / 2 = 0.2 and (0.7 + 0.5) / 2 = 0.6: 0.2.
  assert a['dino_se'] == pytest.approx(0.1) and a['dino_se_seeds'] == pytest.approx(0.2)
  assert a['judge_subject'] == pytest.approx(0.6)
  assert a['judge_subject_se'] == pytest.approx(0.1)
  assert a['judge_subject_se_seeds'] == pytest.approx(0.2)
  # judge_context: subjects 0.75, 0.5; seeds (1.0 + 0.0) / 2, (0.5 + 1.0) / 2.
  assert a['judge_context'] == pytest.approx(0.625)
  assert a['judge_context_se'] == pytest.approx(0.125)
  assert a['judge_context_se_seeds'] == pytest.approx(0.125)
  assert a['clip_i_se'] == pytest.approx(0.0) and a['clip_i_se_seeds'] == pytest.approx(0.0)
  # No training seeds (b) or the real images: no seed error bar.
  assert 'dino_se_seeds' not in r['overall']['b'] and 'num_seeds' not in r['overall']['b']
  real = r['overall'][report.REAL]
  assert real['judge_subject'] == pytest.approx(0.75) and real['judge_context'] is None
  assert 'dino_se_seeds' not in real
  assert r['per_subject']['x'][report.REAL]['judge_subject'] == 0.85
  assert report.format_table(r['overall'], ['a', 'b', report.REAL]) == (
      '| Method | DINO | CLIP-I | CLIP-T | Judge subject | Judge context |\n'
      '|---|---|---|---|---|---|\n'
      '| a | 0.400 ± 0.100 (seeds ± 0.200) | 0.500 ± 0.000 (seeds ± 0.000) | '
      '0.200 ± 0.050 (seeds ± 0.100) | 0.600 ± 0.100 (seeds ± 0.200) | '
      '0.625 ± 0.125 (seeds ± 0.125) |\n'
      '| b | 0.400 ± 0.100 | 0.500 ± 0.000 | 0.200 ± 0.050 | 0.600 ± 0.100 | '
      '0.500 ± 0.500 |\n'
      '| Real images | 0.800 ± 0.100 | 0.850 ± 0.100 | N/A | 0.750 ± 0.100 | N/A |\n')
  md = report.results_markdown(r)
  assert 'each subject pools its 2 training seeds' in md and 'Judge context:' in md
  # Without seeds and judge metrics the report keeps the DreamBench layout.
  assert 'training seeds' not in report.results_markdown(report.summarize(RECORDS, ['a']))


def test_validate_config_train_seeds_and_judge():
  config = _driver_config()
  config.train_seeds = (0, 1)
  evaluation.validate_config(config)
  for bad, why in [((0, 0), 'has duplicates'), ((-1,), 'expected a tuple of integers'),
                   (('a',), 'expected a tuple of integers')]:
    config.train_seeds = bad
    with pytest.raises(ValueError, match=f'config key train_seeds=.*{why}'):
      evaluation.validate_config(config)
  config.train_seeds = ()
  config.scorer.judge = '/no/such/judge.msgpack'
  with pytest.raises(ValueError, match="config key scorer.judge='/no/such/judge.msgpack': "
                                       "expected '' \\(off\\), 'toyworld'"):
    evaluation.validate_config(config)
  config.scorer.judge = 'toyworld'
  with pytest.raises(ValueError, match='the judge reads toy-world subjects only'):
    evaluation.validate_config(config)   # synthetic subjects
  config.synthetic_subjects, config.dataset = 0, 'toyworld'
  evaluation.validate_config(config)
  assert ledger_lib.eval_settings(config)['judge'] == 'toyworld'
  assert 'judge' not in ledger_lib.eval_settings(_driver_config())  # old workdirs' settings


def test_driver_train_seeds_distinct_runs_units_and_resume(tmp_path, tiny_sd_dir, monkeypatch,
                                                           scorer):
  monkeypatch.setattr(scorer_lib, 'make_scorer', lambda config, workdir: scorer)
  workdir = str(tmp_path / 'eval')
  calls = {'train': [], 'sample': 0, 'kill_at': 3}

  def train_fn(cfg, run_dir):
    calls['train'].append((cfg.seed, os.path.relpath(run_dir, workdir)))
    shutil.copytree(tiny_sd_dir, os.path.join(run_dir, 'export'))

  sampler_call = sampling.Sampler.__call__

  def counting_sampler(self, *args, **kwargs):
    calls['sample'] += 1
    if calls['sample'] == calls['kill_at']:
      raise _Killed()
    return sampler_call(self, *args, **kwargs)

  monkeypatch.setattr(sampling.Sampler, '__call__', counting_sampler)
  config = _driver_config()
  config.synthetic_subjects = 1
  config.train_seeds = (5, 7)
  # Killed while generating seed 7's first prompt (one prompt per sampler call).
  with pytest.raises(_Killed):
    evaluation.run(config, workdir, train_fn=train_fn)
  runs = [os.path.join('runs', 'tiny', 'synthetic0', f'seed{k}') for k in (5, 7)]
  assert calls['train'] == [(5, runs[0]), (7, runs[1])]
  calls.update(sample=0, kill_at=-1)
  results = evaluation.run(config, workdir, train_fn=train_fn)
  assert calls['sample'] == 2 and len(calls['train']) == 2   # the 2 missing units, no retrain
  fps = [json.load(open(os.path.join(workdir, r, ledger_lib.TRAIN_FINGERPRINT)))['fingerprint']
         for r in runs]
  assert fps[0] != fps[1]   # the seed is part of the training settings
  ledger = ledger_lib.Ledger(os.path.join(workdir, ledger_lib.LEDGER))
  assert sorted(k for k in ledger.records if k[0] == 'prompt') == sorted(
      ('prompt', 'synthetic0', 'tiny', i, fp, k) for k, fp in zip((5, 7), fps) for i in (0, 1))
  for r in results['per_prompt']:
    k = r['train_seed']
    assert r['train_fingerprint'] == fps[(5, 7).index(k)]
    assert all(f.startswith(os.path.join('images', 'tiny', 'synthetic0', f'seed{k}', ''))
               and os.path.isfile(os.path.join(workdir, f)) for f in r['files'])
  for k in (5, 7):
    assert os.path.isfile(os.path.join(workdir, 'grids', 'tiny', 'synthetic0', f'seed{k}.png'))
  row = results['per_subject']['synthetic0']['tiny']
  assert row['num_images'] == 8 and sorted(row['per_seed']) == ['5', '7']
  per_seed = [np.mean([r['dino'] for r in results['per_prompt'] if r['train_seed'] == k])
              for k in (5, 7)]
  overall = results['overall']['tiny']
  assert overall['num_seeds'] == 2 and overall['dino_se'] is None   # one subject
  assert overall['dino_se_seeds'] == pytest.approx(np.std(per_seed, ddof=1) / np.sqrt(2),
                                                   abs=1e-7)
  # Finished: a rerun trains, samples and scores nothing.
  calls.update(sample=0)
  assert evaluation.run(config, workdir, train_fn=train_fn)['per_prompt'] == \
      results['per_prompt']
  assert calls['sample'] == 0 and len(calls['train']) == 2


# -- the toy world's judge ------------------------------------------------------------
def test_judge_metrics_of_a_toy_subject(scorer):
  import dataclasses  # pylint: disable=g-import-not-at-top
  from dpg_jax.toyworld import judge as judge_lib  # pylint: disable=g-import-not-at-top
  from dpg_jax.toyworld import subjects as toy_subjects  # pylint: disable=g-import-not-at-top
  from dpg_jax.toyworld import world  # pylint: disable=g-import-not-at-top
  jp = judge_lib.load()
  judged = scorer_lib.Scorer(scorer.dino, scorer.params['dino'], scorer.clip,
                             scorer.params['clip'], batch_size=4, judge_params=jp)
  star = toy_subjects.get('orange_star')
  photos = toy_subjects.photos(star.name)
  refs = judged.references(photos, attributes=star.attributes)
  real = judged.real_images(refs)
  assert real['judge_subject'] == pytest.approx(
      judge_lib.attribute_score(judge_lib.probabilities(jp, photos), star.attributes), abs=1e-6)
  assert real['judge_subject'] > 0.5   # the judge knows the subject in its photos (0.63)
  # "Generated" = the subject drawn in the snow, and a red heart in the snow.
  snow = np.stack([world.render(dataclasses.replace(toy_subjects.photo_scene(star, i),
                                                    context='snow')) for i in range(3)])
  heart = np.stack([world.render(dataclasses.replace(
      toy_subjects.photo_scene(star, i), cls='heart', colour='red', pattern='solid',
      mark='none', context='snow')) for i in range(3)])
  probs = judge_lib.probabilities(jp, snow)
  out = judged.score(snow, 'a star in the snow', refs)
  assert out['judge_subject'] == pytest.approx(
      judge_lib.attribute_score(probs, star.attributes), abs=1e-6)
  assert out['judge_context'] == pytest.approx(
      judge_lib.accuracy(probs, {'context': world.CONTEXTS.index('snow')})['context'])
  assert out['judge_context'] == 1.0 and len(out['per_image']['judge_subject']) == 3
  assert np.mean(out['per_image']['judge_subject']) == pytest.approx(out['judge_subject'])
  other = judged.score(heart, 'a star in the snow', refs)
  assert other['judge_subject'] < out['judge_subject'] - 0.3
  assert judged.score(snow, 'a star at night', refs)['judge_context'] == 0.0
  # A prompt that names no context: no context score.
  none = judged.score(snow, 'a star next to a red ring', refs)
  assert none['judge_context'] is None and none['per_image']['judge_context'] is None
  # Other sizes are resized to the judge's 64 px.
  big = np.stack([np.asarray(Image.fromarray(im).resize((128, 128), Image.NEAREST))
                  for im in snow])
  assert judged.score(big, 'a star in the snow', refs)['judge_subject'] == pytest.approx(
      out['judge_subject'], abs=0.05)
  # No judge, or a subject without attributes (DreamBench): the three metrics only.
  assert 'judge_subject' not in scorer.score(snow, 'a star', scorer.references(photos,
                                                                                star.attributes))
  assert 'judge_subject' not in judged.score(snow, 'a star', judged.references(photos))
  assert 'judge_subject' not in scorer.real_images(scorer.references(photos, star.attributes))


# -- the toy DreamBench end to end -------------------------------------------------------
# The metric encoders of the toy DreamBench (scorer.dino_model / scorer.clip_model):
# the toy DINO and CLIP shipped in dpg_jax/toyworld/shipped/.
TOY_ENCODERS = 'toyworld'
TOY_STEPS = 150   # per method: enough to lift toy DINO and the judge's score over the base's


def test_toy_dreambench_end_to_end(tmp_path):
  """orange_star x (untrained base, DreamBooth, DPG with the toy-DINO reward) x 2 prompts
  through the driver on the shipped toy SD, toy DINO / CLIP and judge: both trained
  methods draw the subject better than the base model, none beats the photos themselves."""
  from dpg_jax.toyworld import weights  # pylint: disable=g-import-not-at-top
  config = plan.load_config_file('configs/eval_toy.py')
  config.subjects = ('orange_star',)
  config.methods = ('toy_base', 'toy_dreambooth', 'toy_dpg_dino')
  config.train_seeds = ()
  config.train_workers = 1              # train_fn below is local: in this process
  config.prompts_limit = 2              # 'on the grass', 'in the snow'
  config.images_per_prompt = 4
  config.sample.batch_size = 8
  config.train.num_steps = TOY_STEPS
  config.train.checkpoint_every = TOY_STEPS
  config.train.prior_preservation = False   # no class images to sample: a shorter test
  config.scorer.dino_model = config.scorer.clip_model = TOY_ENCODERS
  trained = []

  def train_fn(cfg, run_dir):
    if os.path.basename(os.path.dirname(run_dir)) == 'toy_base':  # the base, untrained
      shutil.copytree(weights.BASE_DIR, os.path.join(run_dir, 'export'))
      return
    from dpg_jax import train  # pylint: disable=g-import-not-at-top
    trained.append(cfg.dpg.enabled)
    train.train_and_evaluate(cfg, run_dir)

  results = evaluation.run(config, str(tmp_path / 'eval'), train_fn=train_fn)
  assert trained == [False, True] and results['incomplete_units'] == 0
  rows = results['overall']
  base, real = rows['toy_base'], rows[report.REAL]
  # Measured: toy DINO 0.31 (base) -> 0.62 (DreamBooth), 0.47 (DPG); judge 0.34 -> 0.41, 0.42.
  for m in ('toy_dreambooth', 'toy_dpg_dino'):
    assert rows[m]['dino'] > base['dino'] + 0.08, (m, rows)
    assert rows[m]['judge_subject'] > base['judge_subject'] + 0.03, (m, rows)
  for m in config.methods:
    row = rows[m]
    assert real['dino'] > row['dino'] and real['judge_subject'] > row['judge_subject'], (m, rows)
    assert row['judge_context'] >= 0.75 and -1 <= row['clip_t'] <= 1, (m, rows)
    assert row['num_subjects'] == 1
  with open(tmp_path / 'eval' / 'results.md') as f:
    assert '| Method | DINO | CLIP-I | CLIP-T | Judge subject | Judge context |' in f.read()

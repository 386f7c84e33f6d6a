"""K subjects at once (dpg_jax/multisubject.py) == K separate single-subject runs."""
import json
import os
import textwrap

import numpy as np
import pytest

from dpg_jax import multisubject
from tests import test_sharding
from tests import test_train as tt

_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import jax, numpy as np
    from PIL import Image
    sys.path.insert(0, '.')
    from dpg_jax import multisubject, train, writers
    from tests import test_train as tt
    sd_dir, tmp = sys.argv[1], sys.argv[2]
    configs = []
    for i, noun in enumerate(('toy', 'cup')):
      folder = os.path.join(tmp, f'photos_{i}')
      os.makedirs(folder, exist_ok=True)
      rs = np.random.RandomState(10 + i)
      for j in range(2):
        Image.fromarray(rs.randint(0, 255, (64, 64, 3), np.uint8)).save(f'{folder}/{j}.png')
      c = tt._config(num_steps=3, checkpoint_every=2, prior_preservation=False, export=True,
                     export_format='flax')
      c.model.pretrained = sd_dir
      c.data.synthetic, c.data.instance_dir, c.data.class_noun = False, folder, noun
      c.mesh.data = 1
      configs.append(c)
    out = {'devices': jax.device_count()}
    singles = [train.train_and_evaluate(c, os.path.join(tmp, f'single_{i}'))
               for i, c in enumerate(configs)]
    many = multisubject.train_subjects(configs, [os.path.join(tmp, f'many_{i}') for i in range(2)])
    leaves = lambda st: [np.asarray(x) for x in jax.tree.leaves((st.params, st.opt_state))]
    out['max_diff'] = [max(float(np.max(np.abs(a - b))) for a, b in zip(leaves(s), leaves(m)))
                       for s, m in zip(singles, many)]
    out['subjects_differ'] = max(float(np.max(np.abs(a - b)))
                                 for a, b in zip(leaves(many[0]), leaves(many[1])))
    out['loss'] = [[[r['loss'] for r in writers.read_metrics(os.path.join(tmp, f'{kind}_{i}'))]
                    for i in range(2)] for kind in ('single', 'many')]
    out['steps'] = [int(m.step) for m in many]
    print(json.dumps(out))
''')


@pytest.mark.slow
def test_k_subjects_at_once_equal_separate_runs(tiny_sd_dir, tmp_path):
  """2 subjects (own photos and class noun), vmapped over a 'subject' mesh axis
  of 2 forced CPU devices: each subject's params, optimiser state and logged
  losses equal its separate single-subject run within 1e-5; each workdir
  holds its own checkpoints and export."""
  res = test_sharding.run_script(_SCRIPT, tiny_sd_dir, tmp_path, n_devices=2)
  assert res['devices'] == 2
  assert max(res['max_diff']) < 1e-5, res
  assert res['subjects_differ'] > 1e-4, res     # two different subjects, not one twice
  single, many = res['loss']
  np.testing.assert_allclose(many, single, atol=1e-5)
  assert res['steps'] == [3, 3]
  for i in range(2):
    w = tmp_path / f'many_{i}'
    assert sorted(os.listdir(w / 'checkpoints')) == ['2', '3']
    assert (w / 'export' / 'model_index.json').is_file()
    assert json.loads((w / 'config.json').read_text())['data']['class_noun'] == ('toy', 'cup')[i]


def test_subject_configs_may_differ_only_in_data():
  a, b = tt._config(), tt._config(learning_rate=3e-4)
  multisubject.check_configs([a, tt._config(**{'data.class_noun': 'cup'})])
  with pytest.raises(ValueError, match=r'subject 1 config key learning_rate=0.0003 differs'):
    multisubject.check_configs([a, b])


from dpg_jax import evaluation  # pylint: disable=g-import-not-at-top,g-bad-import-order
from dpg_jax.evaluation import scorer as scorer_lib  # pylint: disable=g-import-not-at-top,g-bad-import-order
from tests.test_evaluation import _driver_config, scorer  # pylint: disable=unused-import


@pytest.mark.slow
def test_evaluation_trains_a_methods_subjects_as_one_job(tmp_path, tiny_sd_dir, monkeypatch,
                                                         scorer):  # pylint: disable=redefined-outer-name
  """subjects_at_once=0: the evaluation hands all of a method's subjects to one
  multi-subject job, then samples and scores each run as usual; a rerun reuses them."""
  import shutil  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(scorer_lib, 'make_scorer', lambda config, workdir: scorer)
  calls = []

  def train_many_fn(cfgs, run_dirs):
    calls.append([os.path.basename(r) for r in run_dirs])
    multisubject.check_configs(cfgs)           # what the real job accepts
    for r in run_dirs:
      shutil.copytree(tiny_sd_dir, os.path.join(r, 'export'))

  def train_fn(cfg, run_dir):
    raise AssertionError(f'trained {run_dir} alone')

  config = _driver_config()
  config.subjects_at_once = 0
  results = evaluation.run(config, str(tmp_path / 'eval'), train_fn=train_fn,
                           train_many_fn=train_many_fn)
  assert calls == [['synthetic0', 'synthetic1']]
  assert results['incomplete_units'] == 0 and len(results['per_prompt']) == 4
  evaluation.run(config, str(tmp_path / 'eval'), train_fn=train_fn, train_many_fn=train_many_fn)
  assert len(calls) == 1
  config.subjects_at_once = -1
  with pytest.raises(ValueError, match='config key subjects_at_once=-1'):
    evaluation.validate_config(config)

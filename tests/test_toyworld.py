"""The toy world: generator determinism, subjects, shipped weights, and that
DreamBooth on the shipped base model learns a toy subject (judged)."""
import dataclasses
import json
import os

import numpy as np
import pytest

from dpg_jax import data as data_lib
from dpg_jax import encoders
from dpg_jax import models
from dpg_jax.datasets import loading
from dpg_jax.datasets import subjects as subjects_ds
from dpg_jax.toyworld import contrastive
from dpg_jax.toyworld import judge as judge_lib
from dpg_jax.toyworld import model as model_lib
from dpg_jax.toyworld import subjects
from dpg_jax.toyworld import weights
from dpg_jax.toyworld import world

# Half the measured rise of configs/tiny.py (0.31 -> 0.55 on 13 prompts x 1 seed).
DREAMBOOTH_MARGIN = 0.12
# The shipped toy DINO / CLIP, below their figures measured on these test sets:
# subject leave-one-out top-1 100%, cosine same 0.89 vs other -0.05, 24
# held-out objects top-1 62% (chance 4%); CLIP zero-shot on 72 scenes: context
# 100%, colour 28% (chance 14%; 36% on 240), class at chance (README).
DINO_SUBJECT_TOP1 = 0.9
DINO_COS_GAP = 0.5
DINO_HELD_OUT_TOP1 = 0.4
CLIP_CONTEXT = 0.9
CLIP_COLOUR = 0.2


# -- generator -----------------------------------------------------------------
def test_scenes_are_deterministic_and_seeded():
  a_img, a_sc, a_cap = world.make_dataset(3, 6, 64, start=10)
  b_img, b_sc, b_cap = world.make_dataset(3, 6, 64, start=10)
  assert a_img.dtype == np.uint8 and a_img.shape == (6, 64, 64, 3)
  assert np.array_equal(a_img, b_img) and a_sc == b_sc and a_cap == b_cap
  # Scene i does not depend on where the range starts.
  c_img, c_sc, _ = world.make_dataset(3, 2, 64, start=14)
  assert np.array_equal(c_img, a_img[4:]) and c_sc == a_sc[4:]
  d_img, _, _ = world.make_dataset(4, 6, 64, start=10)
  assert not np.array_equal(a_img, d_img)


def test_render_is_antialiased_and_shows_the_body_colour():
  s = world.Scene(cls='heart', colour='red', secondary='white', pattern='solid', mark='none',
                  context='snow', x=0.0, y=0.0, scale=0.5, angle=0.0, bg_seed=1)
  img = world.render(s, 64).astype(int)
  red = np.abs(img - np.round(np.array(world.RGB['red']) * 255)).max(-1) < 60
  assert 0.08 < red.mean() < 0.6, red.mean()
  # Supersampling blends the rim into the snow: edge pixels between the two.
  row = img[32, :, 0]
  assert len(np.unique(row)) > 8


def test_captions_name_the_scene_and_never_a_held_out_triple():
  rng = np.random.default_rng(0)
  held = set(world.HELD_OUT)
  for i in range(3000):
    r = world.scene_seed(0, i)
    s = world.sample_scene(r)
    assert (s.cls, s.colour, s.pattern) not in held
    cap = world.caption(s, r)
    assert s.cls in cap.split()
  full = world.caption(dataclasses.replace(s, pattern='striped', mark='eye'))
  assert f'with {s.secondary} stripes' in full and 'with an eye' in full
  assert world.CONTEXT_PHRASES[s.context] in full
  assert world.with_articles('a orange star with a eye') == 'an orange star with an eye'
  del rng


def test_every_caption_word_is_one_token():
  vocab, _ = model_lib.tokenizer_vocab()
  for w in world.vocabulary() + model_lib.EXTRA_WORDS:
    if len(w) > 1:
      assert w + '</w>' in vocab, w


def test_labels_round_trip():
  s = world.sample_scene(world.scene_seed(0, 1))
  lab = world.labels(s)
  assert {h: world.LABELS[h][v] for h, v in lab.items()} == {
      'cls': s.cls, 'colour': s.colour, 'secondary': s.secondary, 'pattern': s.pattern,
      'mark': s.mark, 'context': s.context}


# -- subjects --------------------------------------------------------------------
def test_toy_subjects_are_unseen_combinations_with_prompts():
  assert len(subjects.SUBJECTS) >= 8
  held = set(world.HELD_OUT)
  for s in subjects.SUBJECTS:
    assert (s.cls, s.colour, s.pattern) in held
  assert 10 <= len(subjects.PROMPT_TEMPLATES) <= 25
  sub = loading.load_subject('orange_star', dataset='toyworld')
  assert isinstance(sub, subjects_ds.Subject)
  assert (sub.class_noun, len(sub)) == ('star', subjects.NUM_PHOTOS)
  assert sub.prompts('sks')[0] == 'a sks star on the grass'
  photos = np.stack(sub.images)
  assert len({p.tobytes() for p in photos}) == len(photos)  # varied poses/contexts
  assert np.array_equal(photos, subjects.photos('orange_star'))


def test_dreambench_layout_reads_back(tmp_path):
  folder = subjects.write_dreambench(str(tmp_path / 'toy'))
  meta = json.load(open(os.path.join(folder, 'subjects.json')))
  assert meta['orange_star'] == {'cls': 'star', 'colour': 'orange', 'pattern': 'striped',
                                 'secondary': 'purple', 'mark': 'eye'}
  s = subjects_ds.Subject.from_folder(os.path.join(folder, 'blue_heart'), 'heart',
                                      prompt_templates=subjects.PROMPT_TEMPLATES)
  assert len(s) == subjects.NUM_PHOTOS and s.images[0].shape == (64, 64, 3)
  assert np.array_equal(s.images[0], subjects.photos('blue_heart')[0])


def test_synthetic_subject_is_the_toy_subject(tmp_path):
  paths = data_lib.make_synthetic_subject(str(tmp_path / 's'), num_images=5, resolution=64)
  images, _ = data_lib.load_images(str(tmp_path / 's'), 64)
  assert len(paths) == 5 and np.array_equal(images, subjects.photos(subjects.DEFAULT))


# -- shipped weights -------------------------------------------------------------
# Skipped only in a checkout without dpg_jax/toyworld/shipped/ (a rebuild in progress).
_SHIPPED = pytest.mark.skipif(not os.path.isfile(weights.RECORD_PATH),
                              reason='no shipped toy-world weights (dpg_jax/toyworld/shipped/)')


@_SHIPPED
def test_shipped_weights_match_their_record_and_load():
  rec = weights.verify()
  assert set(rec['stages']) == {'vae', 'unet', 'judge', 'dino', 'clip'}
  size = sum(os.path.getsize(os.path.join(weights.WEIGHTS_DIR, f)) for f in rec['files'])
  assert size <= 30e6, size
  sd, params = models.load_stable_diffusion('toyworld')   # the loader's name for BASE_DIR
  assert sd.unet.config.block_out_channels == model_lib.UNET['block_out_channels']
  assert sd.scaling_factor == pytest.approx(rec['stages']['vae']['scaling_factor'])
  assert set(params) == {'unet', 'vae', 'text_encoder'}
  jp = judge_lib.load()
  # The judge reads clean scenes it never trained on. The body colour is
  # only defined where the pattern leaves it the larger area (solid, dotted):
  # stripes and checks split the object half and half between two colours.
  imgs, scenes, _ = world.make_dataset(99, 96, 64)
  probs = judge_lib.probabilities(jp, imgs)
  labels = world.label_arrays(scenes)
  acc = judge_lib.accuracy(probs, {'cls': labels['cls'], 'context': labels['context']})
  plain = np.asarray([s.pattern in ('solid', 'dotted') for s in scenes])
  acc['colour'] = float(np.mean(np.argmax(probs['colour'][plain], -1) ==
                                labels['colour'][plain]))
  assert acc['cls'] > 0.8 and acc['colour'] > 0.9 and acc['context'] > 0.95, acc


@_SHIPPED
def test_the_shipped_dino_tells_the_toy_subjects_apart():
  """Through the loader every user goes through (encoders.load_dino('toyworld')):
  each subject photo's nearest neighbour among the other 39 photos of the 8
  subjects is a photo of the same subject, and photos of one subject are closer
  than photos of two (the gap DreamBench's DINO metric reads)."""
  encoder, params = encoders.load_dino('toyworld')
  assert encoder.image_size == 64
  r = contrastive.dino_retrieval(encoder, params, num_identities=24)
  assert r['subjects_loo_top1'] > DINO_SUBJECT_TOP1, r
  assert r['subjects_cos_same'] > r['subjects_cos_other'] + DINO_COS_GAP, r
  assert r['held_out_top1'] > DINO_HELD_OUT_TOP1, r   # 24 objects, 2 per held-out triple


@_SHIPPED
def test_the_shipped_clip_reads_context_and_colour_zero_shot():
  encoder, params = encoders.load_clip('toyworld')
  z = contrastive.clip_zero_shot(encoder, params, num_scenes=72)
  assert z['context'] > CLIP_CONTEXT and z['colour'] > CLIP_COLOUR, z


def test_named_encoders_are_the_shipped_ones_or_say_how_to_rebuild(monkeypatch, tmp_path):
  missing = str(tmp_path / 'nothing')
  monkeypatch.setitem(encoders.NAMED_ENCODERS, 'toyworld', lambda what: missing)
  with pytest.raises(FileNotFoundError, match=f"'toyworld' \\(from config key "
                     f"'dpg.dino_model'\\).*{missing}.*dpg_jax.toyworld.pretrain"):
    encoders.load_dino('toyworld', config_key='dpg.dino_model')
  monkeypatch.undo()
  assert encoders.NAMED_ENCODERS['toyworld']('DINO model') == weights.DINO_DIR
  assert encoders.NAMED_ENCODERS['toyworld']('CLIP model') == weights.CLIP_DIR


def test_the_named_model_is_the_shipped_base_or_says_how_to_rebuild(monkeypatch, tmp_path):
  missing = str(tmp_path / 'nothing')
  monkeypatch.setitem(models.NAMED_MODELS, 'toyworld', lambda: missing)
  with pytest.raises(FileNotFoundError, match=f"model.pretrained='toyworld': .*{missing}.*"
                     'dpg_jax.toyworld.pretrain'):
    models.load_stable_diffusion('toyworld')
  monkeypatch.undo()
  assert models.NAMED_MODELS['toyworld']() == weights.BASE_DIR


def test_the_embedded_default_is_the_toy_world_and_passes_the_config_checks():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from dpg_jax import train  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  train.validate_config(c)
  assert c.model.pretrained in models.NAMED_MODELS and not c.model.tiny


@_SHIPPED
def test_a_tampered_file_is_named(tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  copy = tmp_path / 'w'
  shutil.copytree(weights.WEIGHTS_DIR, copy)
  with open(copy / 'judge.msgpack', 'ab') as f:
    f.write(b'x')
  with pytest.raises(ValueError, match='judge.msgpack'):
    weights.verify(str(copy))


# -- the point of it all: DreamBooth on the shipped base learns the subject ------
@_SHIPPED
def test_dreambooth_on_the_shipped_base_learns_the_toy_subject(tmp_path):
  """configs/tiny.py as it runs (shipped base, orange_star): the judge's score of the
  subject's attributes on its prompts rises clearly above the base model's, and the
  prompts' contexts are mostly kept."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from dpg_jax import train  # pylint: disable=g-import-not-at-top
  from dpg_jax.toyworld import checks  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  assert c.data.class_noun == subjects.get(subjects.DEFAULT).cls
  c.export = False
  c.sample.prompts = ()
  c.checkpoint_every = 0
  c.log_every = 0
  state = train.train_and_evaluate(c, str(tmp_path / 'run'))
  sd, base = models.load_stable_diffusion(weights.BASE_DIR)
  tuned = {**base, **state.params}
  jp = judge_lib.load()
  before, _ = checks.subject_scores(sd, base, jp, subjects.DEFAULT, seeds_per_prompt=1)
  after, _ = checks.subject_scores(sd, tuned, jp, subjects.DEFAULT, seeds_per_prompt=1)
  assert after['attribute_score'] > before['attribute_score'] + DREAMBOOTH_MARGIN, (before, after)
  # The prompts' contexts survive (measured 7 of 8; chance 1/6; twice the learning
  # rate kept 1/2, a drifting text encoder 1/8).
  assert after['context_accuracy'] > 0.6, (before, after)


# -- the pretraining loop ----------------------------------------------------------
def _quadratic_fit(stage_dir, num_steps):
  """pretrain.fit on a two-parameter least-squares problem (the loop, not a model)."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from dpg_jax import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from dpg_jax.toyworld import pretrain  # pylint: disable=g-import-not-at-top
  config = pretrain.get_config()
  config.checkpoint_every, config.log_every = 5, 1
  opt = optimizer_lib.make_optimizer(pretrain.optimizer_config(
      ml_collections.ConfigDict(dict(learning_rate=0.3, warmup_steps=1)), 20))

  def loss(params, batch, rng):
    del rng
    return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2), {}

  def batch_fn(step):   # a pure function of the step, as every stage's is
    r = np.random.default_rng(step)
    x = r.normal(size=(8, 2)).astype(np.float32)
    return {'x': x, 'y': x @ np.asarray([2.0, -1.0], np.float32)}

  step = jax.jit(functools.partial(pretrain._simple_step, loss, opt.tx))  # pylint: disable=protected-access
  state = pretrain._new_state({'w': jnp.zeros(2)}, opt.tx)  # pylint: disable=protected-access
  return pretrain.fit('judge', str(stage_dir), state, step, batch_fn, num_steps, config)


def test_pretrain_fit_resumed_equals_uninterrupted_and_sums_its_seconds(tmp_path):
  whole, whole_last, _ = _quadratic_fit(tmp_path / 'a', 20)
  _, _, first_seconds = _quadratic_fit(tmp_path / 'b', 10)    # "killed" after its save at 10
  resumed, resumed_last, seconds = _quadratic_fit(tmp_path / 'b', 20)
  np.testing.assert_array_equal(np.asarray(resumed.params['w']), np.asarray(whole.params['w']))
  assert int(resumed.step) == 20 and resumed_last == whole_last
  assert whole_last['loss'] < 0.2   # it learns: the loss at w=0 is ~5
  assert seconds > first_seconds > 0
  rows = [json.loads(l) for l in open(tmp_path / 'b' / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == list(range(1, 21))
  assert all(a['s'] <= b['s'] for a, b in zip(rows, rows[1:]))  # time keeps counting up


@pytest.mark.slow
@_SHIPPED
def test_the_dino_and_clip_stages_write_encoders_that_load_and_measure(tmp_path):
  """--stage=dino then --stage=clip at toy sizes, on the shipped VAE (as <workdir>/vae/pipeline):
  each writes a HF directory the encoders load, and a done.json with its measures."""
  from dpg_jax.toyworld import pretrain  # pylint: disable=g-import-not-at-top
  config = pretrain.get_config()
  config.num_scenes, config.chunk, config.checkpoint_every, config.log_every = 40, 40, 2, 1
  config.dino.update(steps=2, batch_groups=2, group_size=2, pool_groups=3, views=2,
                     eval_identities=6)
  config.clip.update(steps=2, batch_size=8, eval_scenes=12)
  config.judge.recon_scenes = 8
  os.makedirs(tmp_path / 'vae')
  os.symlink(weights.BASE_DIR, tmp_path / 'vae' / 'pipeline')
  pretrain.run(str(tmp_path), config, 'dino')
  pretrain.run(str(tmp_path), config, 'clip')
  dino = json.load(open(tmp_path / 'dino' / 'done.json'))
  clip = json.load(open(tmp_path / 'clip' / 'done.json'))
  assert dino['steps'] == 2 and 0 <= dino['retrieval']['held_out_top1'] <= 1
  assert {'subjects_loo_top1', 'subjects_cos_same', 'held_out_top1_vae'} <= set(dino['retrieval'])
  assert set(clip['zero_shot']['chance']) == {'cls', 'colour', 'context'}
  views = np.load(tmp_path / 'dino' / 'views.npz')['views']
  assert views.shape == (6, 2, 64, 64, 3)
  enc, _ = encoders.load_dino(str(tmp_path / 'dino' / 'model'))
  assert enc.image_size == 64
  enc, _ = encoders.load_clip(str(tmp_path / 'clip' / 'model'))
  assert enc.max_length == 32 and enc.tokenize(['a sks star']).shape == (1, 32)

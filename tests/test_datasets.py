"""Tests for dpg_jax.datasets (TFDS builders without TensorFlow, subjects)."""
import dataclasses
import json
import pathlib
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from dpg_jax import datasets
from dpg_jax.datasets import common
from dpg_jax.datasets import customconcept101
from dpg_jax.datasets import dreambench
from dpg_jax.datasets import loading

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / 'shared' / 'data' / 'dreambench'
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(),
    reason=f'DreamBench sample not found at {SHARED} (../shared beside the '
    'checkout; absent in a fresh clone).')

tfds.disable_progress_bar()


def _noise(h, w, seed):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def _write_prompts_file(path, classes):
  lines = ['Classes', '', 'subject_name,class']
  lines += [f'{s},{c}' for s, c in classes.items()]
  lines += ['', 'Prompts', '', 'Object Prompts', '', 'prompt_list = [']
  lines += ["'a {0} {1} in the jungle'.format(unique_token, class_token),",
            "'a red {0} {1}'.format(unique_token, class_token)", ']']
  lines += ['', 'Live Subject Prompts', '', 'prompt_list = [']
  lines += ["'a {0} {1} wearing a red hat'.format(unique_token, class_token)",
            ']']
  path.write_text('\n'.join(lines) + '\n')


@pytest.fixture(scope='module')
def tiny_dreambench(tmp_path_factory):
  """Upstream layout: <root>/dataset/<subject>/*, with odd image kinds."""
  root = tmp_path_factory.mktemp('tiny_dreambench')
  ds = root / 'dataset'
  (ds / 'dog').mkdir(parents=True)
  (ds / 'teapot').mkdir()
  (ds / 'not_listed').mkdir()
  Image.fromarray(_noise(12, 10, 0)).save(ds / 'dog' / '00.jpg')
  Image.fromarray(_noise(8, 9, 1)).save(ds / 'dog' / '01.png')
  # Grayscale and RGBA files must still come back as HWC RGB.
  Image.fromarray(_noise(7, 5, 2)[..., 0]).save(ds / 'teapot' / 'a.png')
  rgba = np.concatenate([_noise(6, 4, 3), np.full((6, 4, 1), 255, np.uint8)],
                        -1)
  Image.fromarray(rgba).save(ds / 'teapot' / 'b.png')
  (ds / 'teapot' / 'notes.txt').write_text('not an image')
  Image.fromarray(_noise(4, 4, 4)).save(ds / 'not_listed' / '00.jpg')
  _write_prompts_file(ds / 'prompts_and_classes.txt',
                      {'dog': 'dog', 'teapot': 'teapot', 'vase': 'vase'})
  (ds / 'references_and_licenses.txt').write_text('credits')
  (root / 'LICENSE').write_text('license')  # Repository root, as upstream.
  return root


@pytest.fixture(scope='module')
def tiny_built(tiny_dreambench, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tiny_data')
  datasets.prepare('dreambench', data_dir=data_dir, manual_dir=tiny_dreambench)
  return data_dir


@pytest.fixture(scope='module')
def shared_built(tmp_path_factory):
  if not SHARED.is_dir():
    pytest.skip(f'DreamBench sample not found at {SHARED}.')
  data_dir = tmp_path_factory.mktemp('shared_data')
  datasets.prepare('dreambench', data_dir=data_dir, manual_dir=SHARED)
  return data_dir


# -- DreamBench constants and prompts_and_classes.txt --------------------------


def test_builtin_constants():
  assert len(dreambench.SUBJECTS) == 30
  assert len(dreambench.LIVE_SUBJECTS) == 9  # and 21 objects
  assert len(dreambench.OBJECT_PROMPTS) == len(dreambench.LIVE_PROMPTS) == 25
  assert dreambench.is_live('dog') and dreambench.is_live('cat2')
  assert not dreambench.is_live('backpack_dog')
  assert not dreambench.is_live('bear_plushie')
  assert dreambench.CLASS_NOUNS['bear_plushie'] == 'stuffed animal'


@needs_shared
def test_parse_shared_prompts_and_classes():
  pc = dreambench.read_prompts_and_classes(SHARED / 'prompts_and_classes.txt')
  assert len(pc.class_nouns) == 30
  assert pc.class_nouns == dreambench.CLASS_NOUNS
  assert list(pc.class_nouns) == list(dreambench.SUBJECTS)
  assert len(pc.object_prompts) == len(pc.live_prompts) == 25
  assert pc.object_prompts == dreambench.OBJECT_PROMPTS
  assert pc.live_prompts == dreambench.LIVE_PROMPTS
  assert pc.object_prompts[0] == 'a {} in the jungle'
  assert pc.live_prompts[10] == 'a {} wearing a red hat'


def test_prompts_helper():
  dog = dreambench.prompts('dog')
  assert len(dog) == 25 and dog[0] == 'a sks dog in the jungle'
  assert 'a sks dog wearing a santa hat' in dog
  bag = dreambench.prompts('backpack_dog', identifier='zwx')
  assert bag[13] == 'a zwx backpack floating on top of water'
  # Without identifier (CLIP-T): no double space.
  assert dreambench.prompts('bear_plushie', '')[-1] == (
      'a cube shaped stuffed animal')
  with pytest.raises(ValueError, match=r"'dgo'.*backpack, backpack_dog"):
    dreambench.prompts('dgo')


def test_parse_rejects_other_text():
  with pytest.raises(ValueError, match='Not a DreamBench'):
    dreambench.parse_prompts_and_classes('hello\nworld\n')


# -- dreambench builder: shared sample -----------------------------------------


@needs_shared
def test_shared_sample_roundtrip(shared_built):
  on_disk = {p.name: len(common.list_images(p))
             for p in SHARED.iterdir() if p.is_dir()}
  assert len(on_disk) == 5
  builder = datasets.prepare('dreambench', data_dir=shared_built)
  md = builder.info.metadata
  assert md['subjects'] == sorted(on_disk)
  assert len(md['missing_subjects']) == 25
  source = tfds.data_source('dreambench', split='train', data_dir=shared_built)
  assert len(source) == sum(on_disk.values())
  counts = {}
  for i in range(len(source)):
    ex = source[i]
    subject = ex['subject'].decode()
    counts[subject] = counts.get(subject, 0) + 1
    assert ex['class_noun'].decode() == dreambench.CLASS_NOUNS[subject]
    assert bool(ex['live']) == (subject in ('dog', 'cat'))
    image = ex['image']
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    with Image.open(SHARED / subject / ex['filename'].decode()) as im:
      assert image.shape[:2] == (im.height, im.width)
  assert counts == on_disk
  # The credits travel with the built files.
  for name in ('LICENSE.md', 'README.md', 'references_and_licenses.txt'):
    assert (builder.data_path / 'attribution' / name).read_bytes() == (
        SHARED / name).read_bytes()
  assert 'tensorflow' not in sys.modules


@needs_shared
def test_load_subject_shared_matches_folder(shared_built):
  dog = datasets.load_subject('dog', data_dir=shared_built, manual_dir=SHARED)
  assert (dog.name, dog.class_noun, dog.live) == ('dog', 'dog', True)
  assert dog.filenames == ('00.jpg', '01.jpg', '02.jpg', '03.jpg', '04.jpg')
  assert dog.prompts()[0] == 'a sks dog in the jungle'
  assert len(dog.prompts()) == 25
  assert {pathlib.Path(f).name for f in dog.attribution_files} >= {
      'LICENSE.md', 'references_and_licenses.txt'}
  # Same pixels as reading the files directly (no re-encoding in TFDS).
  folder = datasets.Subject.from_folder(SHARED / 'dog', 'dog', live=True)
  for a, b in zip(dog.images, folder.images, strict=True):
    np.testing.assert_array_equal(a, b)
  clock = datasets.load_subject('clock', data_dir=shared_built)
  assert (len(clock), clock.live) == (6, False)
  assert clock.prompts('')[-5] == 'a red clock'


@needs_shared
def test_unknown_subject_errors(shared_built):
  with pytest.raises(ValueError, match=r"'dgo'.*backpack_dog, cat, clock"):
    datasets.load_subject('dgo', data_dir=shared_built)
  with pytest.raises(ValueError, match=r"'teapot' belongs to dreambench"):
    datasets.load_subject('teapot', data_dir=shared_built)


def test_default_dreambench_dir():
  found = datasets.default_dreambench_dir()
  assert found == (SHARED if SHARED.is_dir() else None)


# -- dreambench builder: generated tiny folder (always runs) -------------------


def test_tiny_dreambench(tiny_built, tiny_dreambench):
  builder = datasets.prepare('dreambench', data_dir=tiny_built)
  md = builder.info.metadata
  assert md['subjects'] == ['dog', 'teapot']  # 'not_listed' skipped.
  assert md['missing_subjects'] == ['vase']
  assert md['object_prompts'] == ['a {} in the jungle', 'a red {}']
  assert sorted(md['attribution_files']) == [
      'attribution/LICENSE', 'attribution/prompts_and_classes.txt',
      'attribution/references_and_licenses.txt']
  assert (builder.data_path / 'attribution' / 'LICENSE').read_text() == (
      'license')  # Not clobbered by the LICENSE file TFDS writes.
  source = tfds.data_source('dreambench', split='train', data_dir=tiny_built)
  shapes = [(e['subject'], e['filename'], e['image'].shape)
            for e in (source[i] for i in range(len(source)))]
  assert shapes == [(b'dog', b'00.jpg', (12, 10, 3)),
                    (b'dog', b'01.png', (8, 9, 3)),
                    (b'teapot', b'a.png', (7, 5, 3)),
                    (b'teapot', b'b.png', (6, 4, 3))]
  teapot = datasets.load_subject('teapot', data_dir=tiny_built)
  assert teapot.live is False and teapot.class_noun == 'teapot'
  assert teapot.prompts('sks') == ['a sks teapot in the jungle',
                                   'a red sks teapot']
  ref = common.read_image(tiny_dreambench / 'dataset' / 'teapot' / 'a.png')
  np.testing.assert_array_equal(teapot.images[0], ref)
  dog = datasets.load_subject('dog', data_dir=tiny_built)
  assert dog.live and dog.prompts() == ['a sks dog wearing a red hat']
  assert 'tensorflow' not in sys.modules  # Built and read without TF.


def test_tiny_grain_iteration(tiny_built):
  grain = pytest.importorskip('grain')
  source = tfds.data_source('dreambench', split='train', data_dir=tiny_built)
  images = (grain.MapDataset.source(source)
            .filter(lambda ex: ex['subject'] == b'dog')
            .map(lambda ex: ex['image']))
  assert [im.shape for im in images] == [(12, 10, 3), (8, 9, 3)]


def test_flat_layout_and_rebuild_on_change(tmp_path):
  manual = tmp_path / 'flat'
  (manual / 'cat').mkdir(parents=True)
  Image.fromarray(_noise(5, 5, 0)).save(manual / 'cat' / '00.jpg')
  _write_prompts_file(manual / 'prompts_and_classes.txt',
                      {'cat': 'cat', 'clock': 'clock'})
  data_dir = tmp_path / 'data'
  cat = datasets.load_subject('cat', data_dir=data_dir, manual_dir=manual)
  assert (cat.live, len(cat)) == (True, 1)
  with pytest.raises(ValueError, match="'clock' belongs to dreambench"):
    datasets.load_subject('clock', data_dir=data_dir, manual_dir=manual)
  # A subject added to manual_dir triggers a rebuild.
  (manual / 'clock').mkdir()
  Image.fromarray(_noise(3, 4, 1)).save(manual / 'clock' / '00.png')
  clock = datasets.load_subject('clock', data_dir=data_dir, manual_dir=manual)
  assert clock.images[0].shape == (3, 4, 3)
  assert datasets.available_subjects(data_dir=data_dir) == ['cat', 'clock']


def test_download_path_uses_archive_layout(tmp_path, monkeypatch):
  # No manual data and no ../shared: the builder fetches the GitHub archive,
  # which extracts to dreambooth-main/dataset/...; faked here (no network).
  extracted = tmp_path / 'extracted'
  ds = extracted / 'dreambooth-main' / 'dataset'
  (ds / 'vase').mkdir(parents=True)
  Image.fromarray(_noise(3, 3, 0)).save(ds / 'vase' / '00.jpg')
  _write_prompts_file(ds / 'prompts_and_classes.txt', {'vase': 'vase'})
  (extracted / 'dreambooth-main' / 'LICENSE').write_text('license')
  urls = []

  def fake_download_and_extract(self, url):
    del self
    urls.append(url)
    return extracted

  monkeypatch.setattr(tfds.download.DownloadManager, 'download_and_extract',
                      fake_download_and_extract)
  monkeypatch.setattr(loading, 'default_dreambench_dir', lambda: None)
  vase = datasets.load_subject('vase', data_dir=tmp_path / 'data')
  assert urls == [dreambench.ARCHIVE_URL]
  assert len(vase) == 1 and not vase.live
  assert {pathlib.Path(f).name for f in vase.attribution_files} == {
      'LICENSE', 'prompts_and_classes.txt'}


def test_missing_manual_dir(tmp_path):
  missing = tmp_path / 'nope'
  with pytest.raises(FileNotFoundError, match='nope.*does not exist'):
    datasets.load_subject('dog', data_dir=tmp_path, manual_dir=missing)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='No DreamBench data'):
    datasets.load_subject('dog', data_dir=tmp_path,
                          manual_dir=tmp_path / 'empty')
  with pytest.raises(ValueError, match="Unknown dataset 'imagenet'"):
    datasets.load_subject('dog', dataset='imagenet', data_dir=tmp_path)


# -- custom_concept101 ---------------------------------------------------------


@pytest.fixture(scope='module')
def tiny_cc101(tmp_path_factory):
  root = tmp_path_factory.mktemp('cc101')
  entries = []
  for name, noun, n in (('pet_cat1', 'cat', 3), ('plushie_dice', 'dice', 2),
                        ('scene_barn', 'barn', 0)):
    folder = root / 'benchmark_dataset' / name
    folder.mkdir(parents=True)
    for i in range(n):
      Image.fromarray(_noise(6 + i, 7, i)).save(folder / f'{i}.jpg')
    entries.append({
        'instance_prompt': f'photo of a <new1> {noun}'
                           + (' plushie' if name == 'plushie_dice' else ''),
        'class_prompt': noun,
        'instance_data_dir': f'./benchmark_dataset/{name}',
        'class_data_dir': f'./regularization/{name}',
        'prompt_filename': f'prompts/{noun}.txt',
    })
  (root / 'dataset.json').write_text(json.dumps(entries))
  (root / 'prompts').mkdir()
  (root / 'prompts' / 'cat.txt').write_text(
      'Photo of a {}.\n{} swimming in a pool.\n\na {} and a {}\n')
  (root / 'README.md').write_text('customconcept101 readme')
  return root  # No prompts/dice.txt: that concept gets no prompts.


def test_custom_concept101(tiny_cc101, tmp_path):
  cat = datasets.load_subject('pet_cat1', dataset='custom_concept101',
                              data_dir=tmp_path, manual_dir=tiny_cc101)
  assert (cat.class_noun, cat.live, len(cat)) == ('cat', True, 3)
  assert [im.shape for im in cat.images] == [(6, 7, 3), (7, 7, 3), (8, 7, 3)]
  assert cat.prompts('<new1>') == ['Photo of a <new1> cat.',
                                   '<new1> cat swimming in a pool.']
  dice = datasets.load_subject('plushie_dice', dataset='custom_concept101',
                               data_dir=tmp_path)
  assert (dice.class_noun, dice.live, dice.prompts()) == (
      'dice plushie', False, [])
  builder = datasets.prepare('custom_concept101', data_dir=tmp_path)
  assert builder.info.metadata['missing_subjects'] == ['scene_barn']
  assert (builder.data_path / 'attribution' / 'ATTRIBUTION.txt').is_file()
  assert (builder.data_path / 'attribution' / 'README.md').is_file()
  assert {pathlib.Path(f).name for f in cat.attribution_files} == {
      'ATTRIBUTION.txt', 'README.md'}
  source = tfds.data_source('custom_concept101', split='train',
                            data_dir=tmp_path)
  assert len(source) == 5
  with pytest.raises(ValueError, match=r"'scene_barn' belongs to.*pet_cat1"):
    datasets.load_subject('scene_barn', dataset='custom_concept101',
                          data_dir=tmp_path)


def test_custom_concept101_missing_json(tmp_path):
  (tmp_path / 'benchmark_dataset').mkdir()
  with pytest.raises(FileNotFoundError, match='No dataset.json'):
    customconcept101.read_source(tmp_path)


# -- Subject.from_folder -------------------------------------------------------


def test_subject_from_folder(tmp_path):
  folder = tmp_path / 'my_mug'
  folder.mkdir()
  Image.fromarray(_noise(10, 20, 0)).save(folder / 'b.jpg')
  Image.fromarray(_noise(9, 9, 1)[..., 0]).save(folder / 'a.PNG')
  (folder / 'notes.txt').write_text('x')
  # EXIF orientation 6 (rotate 90 cw): stored 4x8, seen 8x4.
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(_noise(4, 8, 2)).save(folder / 'c.jpg', exif=exif)
  s = datasets.Subject.from_folder(folder, 'mug')
  assert (s.name, s.class_noun, s.live) == ('my_mug', 'mug', False)
  assert s.filenames == ('a.PNG', 'b.jpg', 'c.jpg')
  assert [im.shape for im in s.images] == [(9, 9, 3), (10, 20, 3), (8, 4, 3)]
  assert all(im.dtype == np.uint8 for im in s.images)
  assert s.prompts()[0] == 'a sks mug in the jungle'
  assert len(s.prompts()) == 25
  live = datasets.Subject.from_folder(folder, 'dog', live=True, name='rex',
                                      prompt_templates=['{} at home'])
  assert live.name == 'rex' and live.prompts('') == ['dog at home']
  out = s.export(tmp_path / 'out')
  assert [p.name for p in out] == ['a.png', 'b.png', 'c.png']


def test_subject_from_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    datasets.Subject.from_folder(tmp_path / 'missing', 'dog')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='No images'):
    datasets.Subject.from_folder(tmp_path / 'empty', 'dog')


@needs_shared
def test_from_folder_keeps_attribution(tmp_path):
  s = datasets.Subject.from_folder(SHARED / 'cat', 'cat', live=True)
  names = {pathlib.Path(f).name for f in s.attribution_files}
  assert {'LICENSE.md', 'references_and_licenses.txt'} <= names
  assert len(s) == 5
  # Export one photo only: PNG-encoding 1282 px photos is slow.
  dataclasses.replace(s, images=s.images[:1], filenames=s.filenames[:1]).export(
      tmp_path)
  assert (tmp_path / 'references_and_licenses.txt').is_file()
  assert [p.name for p in common.list_images(tmp_path)] == ['00.png']


def test_image_for_tfds_passthrough(tmp_path):
  Image.fromarray(_noise(5, 6, 0)).save(tmp_path / 'x.jpg')
  raw = common.image_for_tfds(tmp_path / 'x.jpg')
  assert raw == (tmp_path / 'x.jpg').read_bytes()
  Image.fromarray(_noise(5, 6, 0)[..., 0]).save(tmp_path / 'g.jpg')
  assert isinstance(common.image_for_tfds(tmp_path / 'g.jpg'), Image.Image)

"""Tests for dpg_jax.data (host-side subject pipeline)."""
import os
import re
import warnings

import numpy as np
from PIL import Image
from PIL import ImageOps
import pytest

from configs import default as default_config
from dpg_jax import data

DREAMBENCH_DOG = '/work/shared/data/dreambench/dog'


def _save(path, array, **kw):
  Image.fromarray(np.asarray(array, np.uint8)).save(path, **kw)
  return str(path)


def _noise(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def _folder(tmp_path, n=3, size=(40, 40), name='imgs'):
  folder = tmp_path / name
  folder.mkdir()
  for i in range(n):
    _save(folder / f'{i:02d}.png', _noise(*size, seed=i))
  return folder


# -- load_images ---------------------------------------------------------------


def test_list_images_filters_and_sorts(tmp_path):
  for name in ('b.JPG', 'a.png', 'c.webp', 'd.jpeg', 'notes.txt', '._a.jpg',
               '.x.png.tmp'):
    (tmp_path / name).write_bytes(b'')
  (tmp_path / 'sub.png').mkdir()  # Directories are not images.
  names = [os.path.basename(p) for p in data.list_images(tmp_path)]
  assert names == ['a.png', 'b.JPG', 'c.webp', 'd.jpeg']


def test_load_images_shapes_and_paths(tmp_path):
  folder = _folder(tmp_path, n=3, size=(40, 50))
  images, paths = data.load_images(str(folder), 32)
  assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
  assert [os.path.basename(p) for p in paths] == ['00.png', '01.png', '02.png']


@pytest.mark.parametrize('size,resized,box', [
    ((96, 64), (48, 32), (8, 0, 40, 32)),    # wide: crop columns
    ((60, 100), (32, 53), (0, 10, 32, 42)),  # tall: crop rows
])
def test_resize_shortest_side_center_crop_matches_pil(tmp_path, size, resized,
                                                      box):
  w, h = size
  path = _save(tmp_path / 'x.png', _noise(h, w))
  images, _ = data.load_images(str(tmp_path), 32)
  ref = Image.open(path).convert('RGB').resize(resized, Image.LANCZOS).crop(box)
  np.testing.assert_array_equal(images[0], np.asarray(ref))


def test_exif_orientation_applied(tmp_path):
  # Stored 40 wide x 20 tall, left half red, right half blue; orientation 6
  # means "rotate 90 degrees clockwise to display": red ends up on top.
  img = np.zeros((20, 40, 3), np.uint8)
  img[:, :20] = (255, 0, 0)
  img[:, 20:] = (0, 0, 255)
  exif = Image.Exif()
  exif[0x0112] = 6
  _save(tmp_path / 'rot.jpg', img, exif=exif.tobytes(), quality=95)
  images, _ = data.load_images(str(tmp_path), 20)
  out = images[0].astype(int)
  # Center 20x20 crop of the 20 wide x 40 tall upright image: rows 0-9 red,
  # rows 10-19 blue (without the transpose it would be left red / right blue).
  assert (out[2:8, :, 0] > 200).all() and (out[2:8, :, 2] < 60).all()
  assert (out[12:18, :, 2] > 200).all() and (out[12:18, :, 0] < 60).all()


def test_modes_convert_to_rgb(tmp_path):
  gray = np.tile(np.arange(0, 240, 6, dtype=np.uint8)[None], (40, 1))
  Image.fromarray(gray, 'L').save(tmp_path / 'a_gray.png')
  rgba = np.zeros((40, 40, 4), np.uint8)
  rgba[..., :3] = (10, 200, 30)
  rgba[:, :20, 3] = 255  # Left opaque, right fully transparent.
  Image.fromarray(rgba, 'RGBA').save(tmp_path / 'b_rgba.png')
  Image.fromarray(_noise(40, 40)).convert('P').save(tmp_path / 'c_pal.png')
  Image.new('CMYK', (40, 40), (0, 255, 255, 0)).save(tmp_path / 'd_cmyk.jpg',
                                                     quality=95)
  g16 = (np.tile(np.arange(40, dtype=np.uint16)[None], (40, 1)) * 1000)
  Image.fromarray(g16).save(tmp_path / 'e_g16.png')
  images, _ = data.load_images(str(tmp_path), 40)
  assert images.shape == (5, 40, 40, 3)
  np.testing.assert_array_equal(images[0], np.repeat(gray[..., None], 3, -1))
  np.testing.assert_array_equal(images[1][:, :20], np.full((40, 20, 3),
                                                           (10, 200, 30)))
  np.testing.assert_array_equal(images[1][:, 20:], 255)  # Alpha over white.
  # Palette and CMYK: decoded as PIL decodes them (not a flat fill).
  pil_rgb = lambda name: np.asarray(Image.open(tmp_path / name).convert('RGB'))
  np.testing.assert_array_equal(images[2], pil_rgb('c_pal.png'))
  assert len(np.unique(images[2].reshape(-1, 3), axis=0)) > 64
  np.testing.assert_array_equal(images[3], pil_rgb('d_cmyk.jpg'))
  np.testing.assert_allclose(images[3].reshape(-1, 3).mean(0), (255, 0, 0), atol=3)
  # 16-bit gray keeps its ramp (v / 257, rounded) instead of clipping to white.
  ramp = np.round(np.arange(40) * 1000 / 257.0).astype(np.uint8)
  np.testing.assert_array_equal(images[4], np.broadcast_to(ramp[None, :, None], (40, 40, 3)))


def test_random_crop_deterministic_in_seed(tmp_path):
  # Column x encoded in the pixel so the crop offset can be read back.
  x = np.arange(400)
  img = np.zeros((40, 400, 3), np.uint8)
  img[..., 0], img[..., 1] = x % 256, x // 256
  _save(tmp_path / 'wide.png', img)
  offsets = []
  for seed in (0, 1, 2, 0):
    images, _ = data.load_images(str(tmp_path), 40, center_crop=False,
                                 seed=seed)
    cols = images[0, 0, :, 0].astype(int) + 256 * images[0, 0, :, 1].astype(int)
    np.testing.assert_array_equal(cols, cols[0] + np.arange(40))  # A window.
    offsets.append(int(cols[0]))
  assert offsets[0] == offsets[3]
  assert len(set(offsets[:3])) == 3, offsets
  center, _ = data.load_images(str(tmp_path), 40)
  assert center[0, 0, 0, 0] == 180  # (400 - 40) // 2


def test_errors_name_path_and_config_key(tmp_path):
  missing = tmp_path / 'nope'
  with pytest.raises(data.DataError,
                     match=rf'data\.instance_dir=.*{re.escape(str(missing))}'
                     r'.*does not exist'):
    data.load_images(str(missing), 32)
  a_file = tmp_path / 'file.png'
  a_file.write_bytes(b'x')
  with pytest.raises(data.DataError,
                     match=rf'my\.key=.*{re.escape(str(a_file))}'
                     r'.*not a directory'):
    data.load_images(str(a_file), 32, config_key='my.key')
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'readme.txt').write_text('hi')
  with pytest.raises(data.DataError, match=rf'{re.escape(str(empty))}.*no '
                     r'images.*\.jpg, \.jpeg, \.png, \.webp'):
    data.load_images(str(empty), 32)
  with pytest.raises(data.DataError, match=r'data\.instance_dir is empty'):
    data.load_images('', 32)
  with pytest.raises(data.DataError, match=r'data\.resolution'):
    data.load_images(str(empty), 0)


def test_unread_image_formats_named_in_one_warning(tmp_path):
  folder = _folder(tmp_path, n=2)
  _save(folder / 'real.bmp', _noise(40, 40))   # read, as dpg_jax.datasets does
  for name in ('IMG_1.HEIC', 'scan.tif', 'shot.cr2', 'a.gif', 'dl.jfif', 'notes.txt',
               '._x.heic'):
    (folder / name).write_bytes(b'')
  (folder / 'dir.tiff').mkdir()
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter('always')
    images, paths = data.load_images(str(folder), 32)
  assert [os.path.basename(p) for p in paths] == ['00.png', '01.png', 'real.bmp']
  assert images.shape == (3, 32, 32, 3)
  messages = [str(w.message) for w in record if issubclass(w.category, data.DataWarning)]
  assert len(messages) == 1, messages
  assert messages[0] == (
      f'data.instance_dir={str(folder)!r}: skipping 5 image file(s) in formats that are not '
      'read: IMG_1.HEIC, a.gif, dl.jfif, scan.tif, shot.cr2; convert them to PNG or JPEG to '
      'use them.')
  # Only unread formats: the error names them too.
  for p in paths:
    os.remove(p)
  with pytest.raises(data.DataError, match=r'no images found.*skipped 5 image file\(s\)'
                     r'.*IMG_1\.HEIC.*shot\.cr2'):
    data.load_images(str(folder), 32)


def test_no_warning_without_unread_formats(tmp_path):
  folder = _folder(tmp_path, n=2)
  (folder / 'notes.txt').write_bytes(b'')
  with warnings.catch_warnings():
    warnings.simplefilter('error', data.DataWarning)
    data.load_images(str(folder), 32)
  assert data.unread_image_files(str(folder)) == []


def test_corrupt_file_skipped_with_warning(tmp_path):
  folder = _folder(tmp_path, n=2)
  (folder / 'bad.jpg').write_bytes(b'not an image at all')
  good = (folder / '00.png').read_bytes()
  (folder / 'trunc.png').write_bytes(good[:len(good) // 2])
  with pytest.warns(data.DataWarning) as record:
    images, paths = data.load_images(str(folder), 32, min_images=2)
  messages = ' '.join(str(w.message) for w in record)
  assert 'bad.jpg' in messages and 'trunc.png' in messages
  assert images.shape == (2, 32, 32, 3)
  assert [os.path.basename(p) for p in paths] == ['00.png', '01.png']
  # Not enough good ones left: the error lists the bad files.
  with pytest.raises(data.DataError, match=r'at least 3 readable.*found 2 of 4'
                     r'.*bad\.jpg.*trunc\.png'):
    data.load_images(str(folder), 32, min_images=3)


def test_all_corrupt_raises(tmp_path):
  (tmp_path / 'bad.png').write_bytes(b'\x89PNG garbage')
  with pytest.raises(data.DataError, match=rf'data\.instance_dir=.*found 0 of 1'
                     rf'.*{re.escape(str(tmp_path / "bad.png"))}'):
    data.load_images(str(tmp_path), 32)


def test_small_image_upscaled_with_warning(tmp_path):
  path = _save(tmp_path / 'small.png', _noise(24, 16))
  with pytest.warns(data.DataWarning, match=r'small\.png.*16x24.*upscaling'):
    images, _ = data.load_images(str(tmp_path), 32)
  ref = Image.open(path).resize((32, 48), Image.BICUBIC).crop((0, 8, 32, 40))
  np.testing.assert_array_equal(images[0], np.asarray(ref))


@pytest.mark.skipif(not os.path.isdir(DREAMBENCH_DOG),
                    reason=f'DreamBench sample not present at {DREAMBENCH_DOG}')
def test_dreambench_dog():
  images, paths = data.load_images(DREAMBENCH_DOG, 64)
  assert images.shape == (len(paths), 64, 64, 3) and len(paths) >= 4
  for image, path in zip(images, paths):  # PIL: EXIF, shortest side 64 (Lanczos), centre
    with Image.open(path) as im:
      im = ImageOps.exif_transpose(im).convert('RGB')
    w, h = im.size
    s = 64 / min(w, h)
    nw, nh = max(64, round(w * s)), max(64, round(h * s))
    im = im.resize((nw, nh), Image.LANCZOS)
    left, top = (nw - 64) // 2, (nh - 64) // 2
    np.testing.assert_array_equal(image, np.asarray(im.crop((left, top, left + 64, top + 64))))


# -- synthetic subject ---------------------------------------------------------


def test_synthetic_subject(tmp_path):
  out = tmp_path / 'syn'
  paths = data.make_synthetic_subject(str(out), num_images=5, resolution=48,
                                      seed=3)
  assert [os.path.basename(p) for p in paths] == [
      f'subject_{i:02d}.png' for i in range(5)]
  mtimes = [os.stat(p).st_mtime_ns for p in paths]
  images, _ = data.load_images(str(out), 48)
  assert images.shape == (5, 48, 48, 3)
  # Same identity everywhere: the orange body covers a visible area ...
  body = (np.abs(images.astype(int) - (245, 140, 25)).max(-1) < 50)
  assert (body.mean((1, 2)) > 0.01).all(), body.mean((1, 2))
  # ... at a different place in each image.
  centers = [np.argwhere(b).mean(0) for b in body]
  assert len({tuple(np.round(c)) for c in centers}) == 5
  # Idempotent: nothing rewritten on a second call.
  assert data.make_synthetic_subject(str(out), num_images=5, resolution=48,
                                     seed=3) == paths
  assert [os.stat(p).st_mtime_ns for p in paths] == mtimes
  # Deterministic in seed, different across seeds.
  again = data.make_synthetic_subject(str(tmp_path / 'b'), num_images=5,
                                      resolution=48, seed=3)
  other = data.make_synthetic_subject(str(tmp_path / 'c'), num_images=5,
                                      resolution=48, seed=4)
  for p, q, r in zip(paths, again, other):
    assert open(p, 'rb').read() == open(q, 'rb').read()
    assert open(p, 'rb').read() != open(r, 'rb').read()
  # A smaller set with a new seed replaces the old one, no stale leftovers.
  data.make_synthetic_subject(str(out), num_images=3, resolution=48, seed=4)
  assert len(data.list_images(str(out))) == 3
  assert not [n for n in os.listdir(out) if n.endswith('.tmp')]


# -- class images --------------------------------------------------------------


class _FakeGenerator:
  """Image k is filled with value k * 10; records every call."""

  def __init__(self, res):
    self.res, self.calls = res, []

  def __call__(self, n, start):
    self.calls.append((n, start))
    values = (np.arange(start, start + n) * 10).astype(np.uint8)
    return np.broadcast_to(values[:, None, None, None],
                           (n, self.res, self.res, 3)).copy()


def _fill(values, res):
  return np.broadcast_to(np.asarray(values, np.uint8)[:, None, None, None],
                         (len(values), res, res, 3))


def test_ensure_class_images_generates_missing_and_reuses(tmp_path):
  class_dir = tmp_path / 'a' / 'class'
  gen = _FakeGenerator(16)
  out = data.ensure_class_images(str(class_dir), 5, 16, gen, batch_size=2)
  assert gen.calls == [(2, 0), (2, 2), (1, 4)]
  np.testing.assert_array_equal(out, _fill([0, 10, 20, 30, 40], 16))
  assert sorted(os.listdir(class_dir)) == [f'class_{i:05d}.png'
                                           for i in range(5)]
  # Reused on the next run: no generation at all.
  gen.calls.clear()
  np.testing.assert_array_equal(
      data.ensure_class_images(str(class_dir), 5, 16, gen, batch_size=2), out)
  np.testing.assert_array_equal(
      data.ensure_class_images(str(class_dir), 3, 16, gen, batch_size=2),
      out[:3])
  assert not gen.calls
  # Only the missing ones: one deleted, one corrupt (warned and overwritten),
  # two more requested.
  os.remove(class_dir / 'class_00003.png')
  (class_dir / 'class_00001.png').write_bytes(b'half a png')
  with pytest.warns(data.DataWarning, match='class_00001.png'):
    out = data.ensure_class_images(str(class_dir), 7, 16, gen, batch_size=2)
  assert gen.calls == [(1, 1), (1, 3), (2, 5)]
  np.testing.assert_array_equal(out, _fill(np.arange(7) * 10, 16))
  assert not [n for n in os.listdir(class_dir) if n.startswith('.')]


def test_ensure_class_images_keeps_user_images_and_checks_output(tmp_path):
  _save(tmp_path / 'mine.jpg', np.full((20, 30, 3), 200, np.uint8), quality=100)
  gen = _FakeGenerator(16)
  out = data.ensure_class_images(str(tmp_path), 2, 16, gen)
  assert gen.calls == [(1, 0)]
  assert out.shape == (2, 16, 16, 3) and abs(int(out[1].mean()) - 200) <= 2
  with pytest.raises(ValueError, match=r'expected uint8\[2, 16, 16, 3\]'):
    data.ensure_class_images(str(tmp_path / 'x'), 2, 16,
                             lambda n, s: np.zeros((n, 16, 16, 3), np.float32))
  assert data.ensure_class_images(str(tmp_path / 'y'), 0, 16, gen).shape == (
      0, 16, 16, 3)


def test_ensure_class_images_unwritable_dir(tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('x')
  with pytest.raises(data.DataError,
                     match=rf'data\.class_dir=.*{re.escape(str(blocker))}'):
    data.ensure_class_images(str(blocker / 'sub'), 2, 16, _FakeGenerator(16))
  with pytest.raises(data.DataError,
                     match=r'data\.class_dir=.*not a directory'):
    data.ensure_class_images(str(blocker), 2, 16, _FakeGenerator(16))


# -- latents -------------------------------------------------------------------


class _FakeEncoder:
  """Per-sample 2x average pool -> NCHW mean; std = 0.1 + |mean|."""

  def __init__(self):
    self.shapes = []

  def __call__(self, x):
    self.shapes.append(x.shape)
    assert x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    b, h, w, c = x.shape
    mean = x.reshape(b, h // 2, 2, w // 2, 2, c).mean((2, 4))
    mean = np.transpose(mean, (0, 3, 1, 2))
    return mean, 0.1 + np.abs(mean)


def test_encode_images_padding_and_flip():
  images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), np.uint8)
  enc = _FakeEncoder()
  mean, std = data.encode_images(enc, images, batch_size=2)
  assert enc.shapes == [(2, 8, 8, 3)] * 3  # Last batch padded: one shape.
  assert mean.shape == std.shape == (5, 3, 4, 4) and mean.dtype == np.float32
  ref_mean, ref_std = _FakeEncoder()(images.astype(np.float32) / 127.5 - 1)
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)
  np.testing.assert_allclose(std, ref_std, rtol=1e-6)
  unpadded, _ = data.encode_images(_FakeEncoder(), images, batch_size=5)
  np.testing.assert_array_equal(mean, unpadded)
  # random_flip: the mirrored copies are appended after the originals.
  fmean, fstd = data.encode_images(_FakeEncoder(), images, batch_size=4,
                                   random_flip=True)
  assert fmean.shape == (10, 3, 4, 4)
  np.testing.assert_array_equal(fmean[:5], mean)
  np.testing.assert_allclose(fmean[5:], mean[..., ::-1], rtol=1e-6)
  np.testing.assert_allclose(fstd[5:], std[..., ::-1], rtol=1e-6)
  with pytest.raises(ValueError, match='uint8'):
    data.encode_images(enc, images.astype(np.float32))


def _latents(n_inst=5, n_cls=7):
  ids = lambda n, off: np.broadcast_to(
      (np.arange(n, dtype=np.float32) + off)[:, None, None, None], (n, 4, 2, 2))
  return data.SubjectLatents(
      instance_mean=ids(n_inst, 0), instance_std=ids(n_inst, 0) + 0.5,
      class_mean=None if n_cls is None else ids(n_cls, 100),
      class_std=None if n_cls is None else ids(n_cls, 100) + 0.5)


def test_sample_batch_deterministic_and_balanced():
  lat = _latents()
  b = data.sample_batch(lat, step=3, seed=0, batch_size=2)
  assert set(b) == {'instance_mean', 'instance_std', 'instance_index', 'class_mean', 'class_std'}
  for k, v in b.items():
    if k != 'instance_index':
      assert v.shape == (2, 4, 2, 2) and v.dtype == np.float32
  assert b['instance_index'].shape == (2,) and b['instance_index'].dtype == np.int32
  np.testing.assert_array_equal(b['instance_index'],
                                data.sample_indices(5, step=3, seed=0, batch_size=2))
  np.testing.assert_array_equal(b['instance_std'], b['instance_mean'] + 0.5)
  again = data.sample_batch(lat, step=3, seed=0, batch_size=2)
  for k in b:
    np.testing.assert_array_equal(b[k], again[k])
  nxt = data.sample_batch(lat, step=4, seed=0, batch_size=2)
  assert not np.array_equal(b['instance_mean'], nxt['instance_mean'])
  # Balanced: 35 steps x 2 = 70 draws = 14 epochs of 5 and 10 epochs of 7.
  inst = np.concatenate([data.sample_indices(5, step=s, seed=0, batch_size=2)
                         for s in range(35)])
  cls = np.concatenate([data.sample_indices(7, step=s, seed=0, batch_size=2,
                                            stream=1) for s in range(35)])
  np.testing.assert_array_equal(np.bincount(inst, minlength=5), [14] * 5)
  np.testing.assert_array_equal(np.bincount(cls, minlength=7), [10] * 7)
  first = [data.sample_indices(5, step=s, seed=0, batch_size=1)
           for s in range(5)]
  other = [data.sample_indices(5, step=s, seed=1, batch_size=1)
           for s in range(5)]
  assert not np.array_equal(first, other)
  # batch_size > num spans several epochs in one step, still balanced.
  idx = data.sample_indices(3, step=1, seed=0, batch_size=6)
  np.testing.assert_array_equal(np.bincount(idx), [2] * 3)


def test_sample_batch_without_class():
  b = data.sample_batch(_latents(n_cls=None), step=0, seed=0, batch_size=3)
  assert set(b) == {'instance_mean', 'instance_std', 'instance_index'}


# -- config helpers ------------------------------------------------------------


def test_resolve_prompts():
  c = default_config.get_config()
  c.data.identifier, c.data.class_noun = 'zwx', 'cat'
  assert data.resolve_prompts(c) == ('a photo of zwx cat', 'a photo of cat')
  c.data.instance_prompt = 'a {identifier} {class_noun} plush'
  c.data.class_prompt = 'a {class_noun} plush'
  assert data.resolve_prompts(c) == ('a zwx cat plush', 'a cat plush')
  c.data.class_prompt = 'a {noun}'
  with pytest.raises(data.DataError, match=r'data\.class_prompt=.*\{noun\}'):
    data.resolve_prompts(c)
  assert data.resolve_class_dir(c, '/w') == '/w/class_images'
  c.data.class_dir = '/c'
  assert data.resolve_class_dir(c, '/w') == '/c'

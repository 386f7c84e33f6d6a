"""Subject data, host side: photos -> uint8 arrays -> VAE latents -> batches.

No model code lives here: encoders and generators are passed in as callables.
Conventions (see models.py): images on the host are NHWC uint8, on device NHWC
float in [-1, 1]; latents are NCHW float32 (`raw` = not yet multiplied by the
VAE scaling factor).

Random crops happen once, at load time, and flips are pre-encoded (see
`encode_images`): instance sets are a handful of photos, so encoding every
augmented variant up front is cheaper than running the VAE every step, and it
keeps each step's batch a pure function of (seed, step).
"""
import dataclasses
import json
import os
import warnings
import zlib

from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageOps

from dpg_jax import fileio

# As dpg_jax.datasets.common.IMAGE_EXTENSIONS: both readers take the same files.
IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp')
# Image files a user may drop into a photo folder that `list_images` does not
# take (Pillow reads some, e.g. .gif/.tif/.jfif/.avif; HEIC and camera raw it
# does not): `load_images` names them in one warning instead of silence.
OTHER_IMAGE_EXTS = (
    '.dib', '.gif', '.apng', '.tif', '.tiff', '.jfif', '.jpe', '.jp2', '.j2k',
    '.jpx', '.jxl', '.avif', '.avifs', '.heic', '.heif', '.ppm', '.pgm', '.pbm', '.pnm',
    '.tga', '.ico', '.psd', '.qoi', '.pcx', '.sgi', '.dds', '.icns', '.mpo', '.svg',
    '.exr', '.hdr', '.raw', '.dng', '.cr2', '.cr3', '.crw', '.nef', '.nrw', '.arw',
    '.srf', '.sr2', '.orf', '.rw2', '.raf', '.pef', '.srw', '.x3f', '.3fr', '.erf',
    '.kdc', '.mrw', '.rwl', '.iiq')

DEFAULT_INSTANCE_PROMPT = 'a photo of {identifier} {class_noun}'
DEFAULT_CLASS_PROMPT = 'a photo of {class_noun}'

_SYNTHETIC_MANIFEST = 'synthetic_subject.json'
_SYNTHETIC_VERSION = 3  # 3: the toy world's larger objects, calmer backgrounds
# Mixed into every sampling seed so batch order is decorrelated from other
# users of `config.seed` (noise, dropout, ...).
_SAMPLE_SALT = 0x5EED_DA7A


class DataError(ValueError):
  """Bad user data: names the path, the config key and what was expected."""


class DataWarning(UserWarning):
  """Recoverable data problem (skipped file, upscaled image, ...)."""


def _where(path, config_key):
  return f'{config_key}={str(path)!r}' if config_key else repr(str(path))


# -----------------------------------------------------------------------------
# Loading photos.
# -----------------------------------------------------------------------------


def list_images(folder):
  """Sorted paths of the image files directly inside `folder`.

  Hidden files are skipped: they are macOS '._x.jpg' metadata or our own
  in-flight temp files, never real images.
  """
  names = sorted(n for n in os.listdir(folder)
                 if not n.startswith('.') and n.lower().endswith(IMAGE_EXTS))
  return [os.path.join(folder, n) for n in names
          if os.path.isfile(os.path.join(folder, n))]


def unread_image_files(folder):
  """Sorted names in `folder` with an image extension that `list_images` skips."""
  return sorted(n for n in os.listdir(folder)
                if not n.startswith('.') and n.lower().endswith(OTHER_IMAGE_EXTS)
                and os.path.isfile(os.path.join(folder, n)))


def _check_folder(folder, config_key):
  if not folder:
    raise DataError(f'{config_key} is empty: expected a folder of images '
                    f'({", ".join(IMAGE_EXTS)}).')
  if not os.path.exists(folder):
    raise DataError(f'{_where(folder, config_key)}: folder does not exist '
                    f'(expected a folder of images).')
  if not os.path.isdir(folder):
    raise DataError(f'{_where(folder, config_key)}: is not a directory '
                    f'(expected a folder of images).')


def _check_resolution(resolution):
  if int(resolution) != resolution or resolution <= 0:
    raise DataError(f'data.resolution={resolution!r}: expected a positive int.')
  return int(resolution)


def _to_rgb(img):
  """Any PIL mode -> RGB; transparent pixels become white."""
  if img.mode in ('I', 'I;16', 'I;16L', 'I;16B', 'I;16N'):
    # 16-bit grayscale: PIL's RGB conversion clips at 255 (white image).
    arr = np.asarray(img, np.float64)
    arr = arr / 257.0 if arr.max() > 255 else arr
    img = Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), 'L')
  if img.mode in ('RGBA', 'LA', 'PA') or (
      img.mode in ('P', 'L', 'RGB') and 'transparency' in img.info):
    # Composite over white: cut-out product shots are the common case, and
    # dropping alpha would expose arbitrary colours under transparent pixels.
    rgba = img.convert('RGBA')
    background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert('RGB')
  return img.convert('RGB')


def _resize_and_crop(img, resolution, *, center_crop, rng):
  """Shortest side -> resolution, then a resolution x resolution crop."""
  w, h = img.size
  scale = resolution / min(w, h)
  new_w = max(resolution, round(w * scale))
  new_h = max(resolution, round(h * scale))
  if (new_w, new_h) != (w, h):
    # Lanczos antialiases when shrinking; bicubic rings less when enlarging.
    method = Image.LANCZOS if scale < 1 else Image.BICUBIC
    img = img.resize((new_w, new_h), method)
  if center_crop:
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
  else:
    left = int(rng.integers(0, new_w - resolution + 1))
    top = int(rng.integers(0, new_h - resolution + 1))
  return img.crop((left, top, left + resolution, top + resolution))


def _load_one(path, resolution, *, center_crop, seed, config_key):
  """One file -> uint8 [R, R, 3]; raises whatever PIL raises on bad files."""
  with Image.open(path) as img:
    img.load()  # Decode now so truncated files fail here, not later.
    img = ImageOps.exif_transpose(img)
    img = _to_rgb(img)
  w, h = img.size
  if min(w, h) < resolution:
    warnings.warn(f'{config_key}: {path} is {w}x{h}, smaller than resolution '
                  f'{resolution}; upscaling it (expect blur).', DataWarning,
                  stacklevel=4)
  # Seeded per file name so adding/removing a photo leaves other crops as is.
  rng = np.random.default_rng(
      [int(seed) & 0xFFFFFFFF, zlib.crc32(os.path.basename(path).encode())])
  img = _resize_and_crop(img, resolution, center_crop=center_crop, rng=rng)
  return np.asarray(img, np.uint8)


def _load_paths(paths, resolution, *, center_crop, seed, config_key):
  """Loads what it can: (images, good paths, [(bad path, reason)])."""
  images, good, bad = [], [], []
  for path in paths:
    try:
      images.append(_load_one(path, resolution, center_crop=center_crop,
                              seed=seed, config_key=config_key))
      good.append(path)
    except Exception as e:  # pylint: disable=broad-except
      # PIL raises many unrelated types on corrupt input (OSError,
      # SyntaxError, struct.error, DecompressionBombError, ...).
      bad.append((path, f'{type(e).__name__}: {e}'))
  return images, good, bad


def _stack(images, resolution):
  if not images:
    return np.zeros((0, resolution, resolution, 3), np.uint8)
  return np.stack(images).astype(np.uint8)


def load_images(folder, resolution, *, center_crop=True, seed=0,
                min_images=1, config_key='data.instance_dir'):
  """Loads a folder of photos as uint8 [N, R, R, 3] and their paths.

  EXIF orientation is applied, every mode becomes RGB (alpha over white), the
  shortest side is resized to `resolution`, then a center (or, with
  center_crop=False, a seeded random) crop is taken. Unreadable files are
  skipped with a DataWarning as long as `min_images` good ones remain.
  """
  resolution = _check_resolution(resolution)
  _check_folder(folder, config_key)
  paths = list_images(folder)
  unread = unread_image_files(folder)
  skipped = (f'{len(unread)} image file(s) in formats that are not read: '
             f'{", ".join(unread)}; convert them to PNG or JPEG to use them'
             if unread else '')
  if not paths:
    raise DataError(f'{_where(folder, config_key)}: no images found (looked '
                    f'for {", ".join(IMAGE_EXTS)}, any case)'
                    + (f'; skipped {skipped}' if unread else '') + '.')
  if unread:
    warnings.warn(f'{_where(folder, config_key)}: skipping {skipped}.', DataWarning,
                  stacklevel=2)
  images, good, bad = _load_paths(paths, resolution, center_crop=center_crop,
                                  seed=seed, config_key=config_key)
  bad_list = '; '.join(f'{p} ({why})' for p, why in bad)
  if len(good) < max(1, min_images):
    raise DataError(
        f'{_where(folder, config_key)}: expected at least {max(1, min_images)} '
        f'readable images, found {len(good)} of {len(paths)}'
        + (f'; unreadable: {bad_list}' if bad else '') + '.')
  for p, why in bad:
    warnings.warn(f'{config_key}: skipping unreadable image {p} ({why}).',
                  DataWarning, stacklevel=2)
  return _stack(images, resolution), good


# -----------------------------------------------------------------------------
# Atomic writes.
# -----------------------------------------------------------------------------


def _save_png(path, image):
  fileio.atomic_write(path, lambda f: Image.fromarray(image).save(f, format='PNG'))


def _make_dir(folder, config_key):
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise DataError(f'{_where(folder, config_key)}: is not a directory '
                    f'(expected a writable folder).')
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise DataError(f'{_where(folder, config_key)}: cannot create the folder '
                    f'({e}); expected a writable directory.') from e
  if not os.access(folder, os.W_OK | os.X_OK):
    raise DataError(f'{_where(folder, config_key)}: folder is not writable.')


# -----------------------------------------------------------------------------
# Synthetic subject.
# -----------------------------------------------------------------------------

# The subject is the toy world's `orange_star` (dpg_jax/toyworld/subjects.py):
# an orange star with purple stripes, a dark rim and one eye, a combination the
# shipped toy SD never saw in pretraining.


def _synthetic_names(num_images):
  return [f'subject_{i:02d}.png' for i in range(num_images)]


def _synthetic_complete(out_dir, manifest, resolution):
  try:
    with open(os.path.join(out_dir, _SYNTHETIC_MANIFEST)) as f:
      if json.load(f) != manifest:
        return False
    for name in manifest['files']:
      with Image.open(os.path.join(out_dir, name)) as img:
        if img.size != (resolution, resolution):
          return False
  except Exception:  # pylint: disable=broad-except
    return False  # Missing / corrupt: regenerate, it is cheap.
  return True


def make_synthetic_subject(out_dir, *, num_images=5, resolution=64, seed=0):
  """Writes `num_images` PNGs of one synthetic subject; returns their paths.

  The toy world's subject `orange_star` (same shape, colours, stripes and eye)
  at varied position, scale and rotation in varied toy-world contexts. Deterministic in `seed`; a complete set
  from an earlier call with the same arguments is reused as is.
  """
  resolution = _check_resolution(resolution)
  if num_images < 1:
    raise DataError(f'num_images={num_images}: expected >= 1.')
  _make_dir(out_dir, 'data.synthetic')
  names = _synthetic_names(num_images)
  paths = [os.path.join(out_dir, n) for n in names]
  manifest = dict(version=_SYNTHETIC_VERSION, seed=int(seed),
                  num_images=int(num_images), resolution=resolution,
                  files=names)
  if _synthetic_complete(out_dir, manifest, resolution):
    return paths
  # Invalidate first so a run killed mid-way never looks complete.
  manifest_path = os.path.join(out_dir, _SYNTHETIC_MANIFEST)
  if os.path.exists(manifest_path):
    os.remove(manifest_path)
  from dpg_jax.toyworld import subjects  # pylint: disable=g-import-not-at-top
  for path, image in zip(paths, subjects.photos(subjects.DEFAULT, num_images, resolution,
                                                seed=seed)):
    _save_png(path, image)
  # Stale images of an earlier, larger set would leak into load_images.
  for name in os.listdir(out_dir):
    if (name.startswith('subject_') and name.endswith('.png')
        and name not in names):
      os.remove(os.path.join(out_dir, name))
  fileio.atomic_write(manifest_path,
                      lambda f: f.write(json.dumps(manifest, indent=1).encode()))
  return paths


# -----------------------------------------------------------------------------
# Prior-preservation class images.
# -----------------------------------------------------------------------------


def _class_name(index):
  return f'class_{index:05d}.png'


def ensure_class_images(class_dir, num_images, resolution, generate_fn, *,
                        batch_size=8, config_key='data.class_dir'):
  """Returns exactly `num_images` class images, generating only missing ones.

  Valid images already in `class_dir` (any name) are reused, first
  `num_images` in sorted order. Missing ones come from
  `generate_fn(n, start_index) -> uint8 [n, R, R, 3]` (images for indices
  start_index .. start_index + n - 1, n <= batch_size; pad inside it if it
  must compile once) and are saved atomically as class_{index:05d}.png, so a
  killed run resumes where it stopped.
  """
  resolution = _check_resolution(resolution)
  if num_images <= 0:
    return _stack([], resolution)
  _make_dir(class_dir, config_key)
  images, good, bad = _load_paths(list_images(class_dir), resolution,
                                  center_crop=True, seed=0,
                                  config_key=config_key)
  for p, why in bad:
    warnings.warn(f'{config_key}: ignoring unreadable class image {p} ({why}); '
                  f'it is regenerated if its index is needed.', DataWarning,
                  stacklevel=2)
  by_path = dict(zip(good, images))
  num_missing = max(0, num_images - len(by_path))
  # Lowest indices whose file is not a valid image (a corrupt file is
  # overwritten); contiguous runs so generate_fn gets (n, start_index).
  taken = {os.path.basename(p) for p in good}
  indices, i = [], 0
  while len(indices) < num_missing:
    if _class_name(i) not in taken:
      indices.append(i)
    i += 1
  runs = []
  for i in indices:
    if runs and runs[-1][-1] == i - 1 and len(runs[-1]) < batch_size:
      runs[-1].append(i)
    else:
      runs.append([i])
  if runs:
    logging.info('Generating %d class images into %s (%d there already; kept for later runs)',
                 num_missing, class_dir, len(by_path))
  for run in runs:
    out = np.asarray(generate_fn(len(run), run[0]))
    expected = (len(run), resolution, resolution, 3)
    if out.shape != expected or out.dtype != np.uint8:
      raise ValueError(f'generate_fn({len(run)}, {run[0]}) returned '
                       f'{out.dtype}{list(out.shape)}; expected uint8'
                       f'{list(expected)}.')
    for index, image in zip(run, out):
      path = os.path.join(class_dir, _class_name(index))
      _save_png(path, image)
      by_path[path] = image
  # Sorted like list_images: the next run returns the same array in order.
  chosen = sorted(by_path, key=os.path.basename)[:num_images]
  return _stack([by_path[p] for p in chosen], resolution)


# -----------------------------------------------------------------------------
# Latents.
# -----------------------------------------------------------------------------


def to_float_images(images_uint8):
  """uint8 NHWC -> float32 NHWC in [-1, 1]."""
  return np.asarray(images_uint8, np.float32) / 127.5 - 1.0


def encode_images(encode_fn, images_uint8, *, batch_size=8, random_flip=False):
  """uint8 [N, R, R, 3] -> raw latent (mean, std), float32 NCHW numpy.

  `encode_fn(float [B, R, R, 3] in [-1, 1]) -> (mean, std)` sees one fixed B
  (the last batch is padded) so a jitted encoder compiles once. With
  random_flip the mirrored images are encoded too and appended: rows N..2N-1
  are the flips of rows 0..N-1.
  """
  images = np.asarray(images_uint8)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f'images: expected uint8 [N, H, W, 3], got '
                     f'{images.dtype}{list(images.shape)}.')
  if not len(images):
    raise ValueError('images: expected at least one image, got none.')
  if random_flip:
    images = np.concatenate([images, images[:, :, ::-1]])
  n = len(images)
  bs = min(int(batch_size), n)  # Never pad a small set up to a big batch.
  outs = []
  for start in range(0, n, bs):
    batch = to_float_images(images[start:start + bs])
    pad = bs - len(batch)
    if pad:
      batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:],
                                              batch.dtype)])
    # Dispatch every batch before reading any back: async devices overlap.
    outs.append((encode_fn(batch), bs - pad))
  means = [np.asarray(m, np.float32)[:k] for (m, _), k in outs]
  stds = [np.asarray(s, np.float32)[:k] for (_, s), k in outs]
  return np.concatenate(means), np.concatenate(stds)


@dataclasses.dataclass
class SubjectLatents:
  """Raw (unscaled) VAE latent distributions, float32 NCHW numpy.

  class_* are None when prior preservation is off.
  """
  instance_mean: np.ndarray
  instance_std: np.ndarray
  class_mean: np.ndarray | None = None
  class_std: np.ndarray | None = None

  @property
  def num_instance(self):
    return len(self.instance_mean)

  @property
  def num_class(self):
    return 0 if self.class_mean is None else len(self.class_mean)


def sample_indices(num, *, step, seed, batch_size, stream=0):
  """Indices into a set of `num` items for training step `step`.

  Epoch-like, not i.i.d.: the items are visited in a fresh permutation per
  epoch, seeded from (seed, stream, epoch), and step s takes positions
  s*B .. s*B+B-1 of that endless sequence. Each item is used equally often
  over every whole epoch, and the batch is a pure function of (seed, step,
  batch_size): identical after a resume and on every host, with no state.
  """
  if num <= 0:
    raise ValueError(f'num={num}: expected at least one item to sample.')
  positions = int(step) * int(batch_size) + np.arange(int(batch_size))
  epochs, offsets = np.divmod(positions, num)
  out = np.empty(int(batch_size), np.int64)
  for epoch in np.unique(epochs):
    rng = np.random.default_rng(
        [int(seed) & 0xFFFFFFFF, _SAMPLE_SALT, int(stream), int(epoch)])
    perm = rng.permutation(num)
    mask = epochs == epoch
    out[mask] = perm[offsets[mask]]
  return out


def sample_batch(latents, *, step, seed, batch_size):
  """Latent batch for `step`: dict of float32 [batch_size, C, h, w] arrays.

  Keys instance_mean/instance_std (+ int32 instance_index), plus class_mean/class_std if class
  latents exist (batch_size of each, from an independent permutation).
  """
  idx = sample_indices(latents.num_instance, step=step, seed=seed,
                       batch_size=batch_size, stream=0)
  # instance_index: which photo (or its flip) x_0 comes from, for per-image rewards.
  batch = dict(instance_mean=latents.instance_mean[idx],
               instance_std=latents.instance_std[idx],
               instance_index=idx.astype(np.int32))
  if latents.class_mean is not None:
    idx = sample_indices(latents.num_class, step=step, seed=seed,
                         batch_size=batch_size, stream=1)
    batch.update(class_mean=latents.class_mean[idx],
                 class_std=latents.class_std[idx])
  return batch


# -----------------------------------------------------------------------------
# Config-facing helpers.
# -----------------------------------------------------------------------------


def format_prompt(template, *, identifier, class_noun, config_key='prompt'):
  """Fills {identifier} and {class_noun} in a prompt template."""
  try:
    return template.format(identifier=identifier, class_noun=class_noun)
  except (KeyError, IndexError, ValueError) as e:
    raise DataError(f'{config_key}={template!r}: bad placeholder ({e}); '
                    f'expected only {{identifier}} and {{class_noun}}.') from e


def resolve_prompts(config):
  """(instance_prompt, class_prompt) of a config, defaults filled in."""
  d = config.data
  kw = dict(identifier=d.identifier, class_noun=d.class_noun)
  return (format_prompt(d.instance_prompt or DEFAULT_INSTANCE_PROMPT,
                        config_key='data.instance_prompt', **kw),
          format_prompt(d.class_prompt or DEFAULT_CLASS_PROMPT,
                        config_key='data.class_prompt', **kw))


def resolve_class_dir(config, workdir):
  """data.class_dir, or <workdir>/class_images when empty."""
  return config.data.class_dir or os.path.join(workdir, 'class_images')

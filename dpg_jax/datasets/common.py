"""Shared by the subject datasets: files, attribution, prompts, base builder.

No TensorFlow: images are read with PIL; what goes into TFDS is either the
file's own bytes or a PIL image that TFDS encodes with PIL.
"""
from collections.abc import Iterable, Sequence
import inspect
import os
import pathlib
import shutil

from etils import epath
import numpy as np
from PIL import Image
from PIL import ImageOps
import tensorflow_datasets as tfds

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp')

# Files that must travel with redistributed images (licenses, photo credits)
# plus the benchmark's own text files; copied wherever the images are copied.
ATTRIBUTION_FILES = (
    'LICENSE', 'LICENSE.md', 'LICENSE.txt', 'README.md',
    'references_and_licenses.txt', 'urls.txt', 'prompts_and_classes.txt',
    'ATTRIBUTION.txt',
)

# Subfolder of a built dataset that holds them: TFDS writes its own LICENSE
# (DatasetInfo.license) at the top level, which would clobber an upstream one.
ATTRIBUTION_DIR = 'attribution'

_EXIF_ORIENTATION = 0x0112


def list_images(folder: os.PathLike[str] | str) -> list[pathlib.Path]:
  """Image files directly in `folder`, sorted by name, hidden ones skipped."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    return []
  return sorted(
      p for p in folder.iterdir()
      if p.is_file() and not p.name.startswith('.')
      and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_image(path: os.PathLike[str] | str) -> np.ndarray:
  """Reads an image file as HWC uint8 RGB, applying its EXIF rotation."""
  with Image.open(path) as im:
    # Phone photos store rotation in EXIF; what people see is the rotated image.
    return np.asarray(ImageOps.exif_transpose(im).convert('RGB'), np.uint8)


def image_for_tfds(path: os.PathLike[str] | str) -> bytes | Image.Image:
  """What to hand `tfds.features.Image` for one file.

  The file's own bytes when PIL decodes them to the right pixels as they are
  (RGB JPEG/PNG, no EXIF rotation): no re-encoding loss, and the decoded array
  equals `read_image(path)`. Otherwise a normalised PIL image, which TFDS saves
  as lossless PNG with PIL (handing it a numpy array would need TensorFlow).
  """
  with Image.open(path) as im:
    orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    if im.format in ('JPEG', 'PNG') and im.mode == 'RGB' and orientation == 1:
      return pathlib.Path(path).read_bytes()
    im = ImageOps.exif_transpose(im).convert('RGB')
    im.load()
    return im


def find_attribution_files(*folders: os.PathLike[str] | str | None
                           ) -> list[pathlib.Path]:
  """Attribution files (see ATTRIBUTION_FILES) in `folders`; first name wins."""
  found = {}
  for folder in folders:
    if folder is None:
      continue
    for name in ATTRIBUTION_FILES:
      path = pathlib.Path(folder) / name
      if name not in found and path.is_file():
        found[name] = path
  return list(found.values())


def copy_files(files: Iterable[os.PathLike[str] | str],
               dest: os.PathLike[str] | str) -> list[pathlib.Path]:
  """Copies `files` into folder `dest` (created); returns the new paths."""
  dest = pathlib.Path(dest)
  dest.mkdir(parents=True, exist_ok=True)
  out = []
  for f in files:
    target = dest / pathlib.Path(f).name
    shutil.copyfile(os.fspath(f), target)
    out.append(target)
  return out


def format_prompt(template: str, identifier: str, class_noun: str) -> str:
  """Fills a '{}' template with '<identifier> <class noun>'.

  An empty identifier gives the class-only prompt (CLIP-T drops the token).
  """
  subject = ' '.join(p for p in (identifier.strip(), class_noun.strip()) if p)
  return ' '.join(template.format(subject).split())


def format_prompts(templates: Sequence[str], identifier: str,
                   class_noun: str) -> list[str]:
  return [format_prompt(t, identifier, class_noun) for t in templates]


def as_str(value) -> str:
  """TFDS Text features decode to bytes in numpy mode."""
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def subject_features() -> tfds.features.FeaturesDict:
  """One example per reference photo; shared by every subject dataset."""
  return tfds.features.FeaturesDict({
      # Stores the JPEG bytes as they are (see image_for_tfds).
      'image': tfds.features.Image(shape=(None, None, 3)),
      'subject': tfds.features.Text(),
      'class_noun': tfds.features.Text(),
      'live': tfds.features.Scalar(np.bool_),
      'filename': tfds.features.Text(),
  })


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder,
                         skip_registration=True):
  """Base of our builders: array_record files, no TensorFlow anywhere."""

  def __init__(self, *, file_format='array_record', **kwargs):
    # array_record: random access through tfds.data_source, no TensorFlow.
    super().__init__(file_format=file_format, **kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds 4.9.10 resolves this for builders inside a package through the
    # optional `importlib_resources` package; the module's file is all it needs.
    return epath.Path(inspect.getfile(cls))

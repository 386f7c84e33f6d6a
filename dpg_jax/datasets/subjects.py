"""`Subject`: the reference photos, class noun and prompts of one subject.

From a benchmark (`dpg_jax.datasets.load_subject('dog')`) or from a plain
folder of the user's own photos (`Subject.from_folder(path, 'dog')`, no TFDS).
"""
from collections.abc import Sequence
import dataclasses
import os
import pathlib

import numpy as np
from PIL import Image

from dpg_jax.datasets import common
from dpg_jax.datasets import dreambench


@dataclasses.dataclass(frozen=True, eq=False)
class Subject:
  """One personalization subject.

  Attributes:
    name: subject name ('dog', 'pet_cat1', or the folder's name).
    class_noun: the class noun ('dog', 'stuffed animal').
    live: live subject (pets, people) vs object; picks DreamBench's prompt list.
    images: reference photos, HWC uint8 RGB at their own resolution.
    filenames: the photos' file names, parallel to `images`.
    prompt_templates: evaluation prompts with one '{}' slot standing for
      '<identifier> <class noun>'; see `prompts()`.
    dataset: where it came from ('dreambench', 'custom_concept101', '').
    attribution_files: license / credit files that must accompany any copy of
      the images (see `export`).
  """
  name: str
  class_noun: str
  live: bool
  images: tuple[np.ndarray, ...]
  filenames: tuple[str, ...] = ()
  prompt_templates: tuple[str, ...] = ()
  dataset: str = ''
  attribution_files: tuple[str, ...] = ()

  def __post_init__(self):
    if not self.images:
      raise ValueError(f'Subject {self.name!r} has no images.')
    if self.filenames and len(self.filenames) != len(self.images):
      raise ValueError('filenames and images differ in length.')

  def __len__(self) -> int:
    return len(self.images)

  def prompts(self, identifier: str = 'sks') -> list[str]:
    """Evaluation prompts, e.g. 'a sks dog in the jungle'.

    `identifier=''` gives the class-only prompts (as CLIP-T scores them).
    """
    return common.format_prompts(self.prompt_templates, identifier,
                                 self.class_noun)

  @classmethod
  def from_folder(cls, path: os.PathLike[str] | str, class_noun: str,
                  live: bool = False, *, name: str | None = None,
                  prompt_templates: Sequence[str] | None = None) -> 'Subject':
    """A subject from a folder of photos (jpg/jpeg/png/webp/bmp).

    Args:
      path: the folder; its image files, sorted by name, are the references.
      class_noun: e.g. 'dog'.
      live: whether the subject is alive; selects the default prompts.
      name: defaults to the folder's name.
      prompt_templates: '{}' templates; defaults to DreamBench's 25 live or
        object prompts.

    Returns:
      The subject, with any LICENSE / README / references_and_licenses.txt of
      the folder (or of a DreamBench-style parent) as attribution files.
    """
    path = pathlib.Path(path)
    if not path.is_dir():
      raise FileNotFoundError(f'Subject folder {path} does not exist.')
    files = common.list_images(path)
    if not files:
      raise FileNotFoundError(
          f'No images ({", ".join(common.IMAGE_EXTENSIONS)}) in {path}.')
    if prompt_templates is None:
      prompt_templates = dreambench.prompt_templates('', live=live)
    # A subject folder of a DreamBench copy has its credits one level up.
    parent = path.parent
    if not (parent / 'references_and_licenses.txt').is_file():
      parent = None
    return cls(
        name=name or path.name,
        class_noun=class_noun,
        live=live,
        images=tuple(common.read_image(f) for f in files),
        filenames=tuple(f.name for f in files),
        prompt_templates=tuple(prompt_templates),
        attribution_files=tuple(
            str(f) for f in common.find_attribution_files(path, parent)),
    )

  def export(self, folder: os.PathLike[str] | str) -> list[pathlib.Path]:
    """Writes the photos (lossless PNG) and the attribution files to `folder`.

    Use this whenever reference photos are copied somewhere: their licenses
    require the credits to travel with them.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = self.filenames or tuple(f'{i:02d}' for i in range(len(self)))
    stems = [pathlib.Path(n).stem for n in names]
    if len(set(stems)) < len(stems):  # e.g. 00.jpg and 00.png: keep both.
      stems = list(names)
    paths = [folder / f'{stem}.png' for stem in stems]
    for image, path in zip(self.images, paths):
      Image.fromarray(image).save(path)
    common.copy_files(self.attribution_files, folder)
    return paths

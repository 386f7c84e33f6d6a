"""DreamBench (DreamBooth, Ruiz et al. CVPR 2023): 30 subjects, 25 prompts each.

The benchmark's constants (`SUBJECTS`, `CLASS_NOUNS`, `LIVE_SUBJECTS`, the
object and live prompt lists) and a TFDS builder `dreambench` that stores the
reference photos in array_record files (built and read without TensorFlow).

Where the builder takes the photos from (first match wins):
  * `manual_dir` in the upstream layout (the google/dreambooth repository):
      <manual_dir>/dataset/<subject>/*.jpg
      <manual_dir>/dataset/prompts_and_classes.txt
  * `manual_dir` flat (the layout of ../shared/data/dreambench):
      <manual_dir>/<subject>/*.jpg
      <manual_dir>/prompts_and_classes.txt
  * no manual data: the public google/dreambooth GitHub archive.
Only the subjects whose folders are present are built (the shared sample has 5
of 30); `info.metadata['subjects']` records which. Class nouns and prompts come
from the source's prompts_and_classes.txt (the built-in copy when it has none).
Its LICENSE / README / references_and_licenses.txt are copied beside the built
files (attribution/): the photographers' credits must travel with the images
(CC-BY 4.0).

Each example: `image` (encoded, decodes to HWC uint8 RGB), `subject`,
`class_noun`, `live` (bool: dogs and cats vs objects), `filename`.
"""
import dataclasses
import logging
import os
import pathlib
import re

import tensorflow_datasets as tfds

from dpg_jax.datasets import common

ARCHIVE_URL = 'https://github.com/google/dreambooth/archive/refs/heads/main.zip'
PROMPTS_FILE = 'prompts_and_classes.txt'

# subject -> class noun, in the order of prompts_and_classes.txt.
CLASS_NOUNS = {
    'backpack': 'backpack', 'backpack_dog': 'backpack',
    'bear_plushie': 'stuffed animal', 'berry_bowl': 'bowl', 'can': 'can',
    'candle': 'candle', 'cat': 'cat', 'cat2': 'cat', 'clock': 'clock',
    'colorful_sneaker': 'sneaker', 'dog': 'dog', 'dog2': 'dog', 'dog3': 'dog',
    'dog5': 'dog', 'dog6': 'dog', 'dog7': 'dog', 'dog8': 'dog',
    'duck_toy': 'toy', 'fancy_boot': 'boot',
    'grey_sloth_plushie': 'stuffed animal', 'monster_toy': 'toy',
    'pink_sunglasses': 'glasses', 'poop_emoji': 'toy', 'rc_car': 'toy',
    'red_cartoon': 'cartoon', 'robot_toy': 'toy', 'shiny_sneaker': 'sneaker',
    'teapot': 'teapot', 'vase': 'vase', 'wolf_plushie': 'stuffed animal',
}
SUBJECTS = tuple(CLASS_NOUNS)
# The paper's 9 live subjects (the rest are 21 objects); the file does not say.
LIVE_SUBJECTS = frozenset(
    ('cat', 'cat2', 'dog', 'dog2', 'dog3', 'dog5', 'dog6', 'dog7', 'dog8'))
_LIVE_CLASS_NOUNS = frozenset(('cat', 'dog'))

# Templates with one '{}' slot for '<identifier> <class noun>' (upstream writes
# 'a {0} {1} ...'.format(unique_token, class_token)).
_SHARED_PROMPTS = (
    'a {} in the jungle',
    'a {} in the snow',
    'a {} on the beach',
    'a {} on a cobblestone street',
    'a {} on top of pink fabric',
    'a {} on top of a wooden floor',
    'a {} with a city in the background',
    'a {} with a mountain in the background',
    'a {} with a blue house in the background',
    'a {} on top of a purple rug in a forest',
)
_SHARED_TAIL = (
    'a red {}',
    'a purple {}',
    'a shiny {}',
    'a wet {}',
    'a cube shaped {}',
)
OBJECT_PROMPTS = _SHARED_PROMPTS + (
    'a {} with a wheat field in the background',
    'a {} with a tree and autumn leaves in the background',
    'a {} with the Eiffel Tower in the background',
    'a {} floating on top of water',
    'a {} floating in an ocean of milk',
    'a {} on top of green grass with sunflowers around it',
    'a {} on top of a mirror',
    'a {} on top of the sidewalk in a crowded street',
    'a {} on top of a dirt road',
    'a {} on top of a white rug',
) + _SHARED_TAIL
LIVE_PROMPTS = _SHARED_PROMPTS + (
    'a {} wearing a red hat',
    'a {} wearing a santa hat',
    'a {} wearing a rainbow scarf',
    'a {} wearing a black top hat and a monocle',
    'a {} in a chef outfit',
    'a {} in a firefighter outfit',
    'a {} in a police outfit',
    'a {} wearing pink glasses',
    'a {} wearing a yellow shirt',
    'a {} in a purple wizard outfit',
) + _SHARED_TAIL

_CITATION = r"""@inproceedings{ruiz2023dreambooth,
  title={DreamBooth: Fine Tuning Text-to-Image Diffusion Models for
         Subject-Driven Generation},
  author={Ruiz, Nataniel and Li, Yuanzhen and Jampani, Varun and
          Pritch, Yael and Rubinstein, Michael and Aberman, Kfir},
  booktitle={CVPR},
  year={2023}
}"""


# --- Benchmark text -----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PromptsAndClasses:
  """Contents of prompts_and_classes.txt; templates use one '{}' slot."""
  class_nouns: dict[str, str]
  object_prompts: tuple[str, ...]
  live_prompts: tuple[str, ...]


BUILTIN = PromptsAndClasses(CLASS_NOUNS, OBJECT_PROMPTS, LIVE_PROMPTS)

_QUOTED = re.compile(r"""^(['"])(.*?)\1""")


def _normalize_template(template: str) -> str:
  out = re.sub(r'\{0\}\s*\{1\}', '{}', template)
  if '{0}' in out or '{1}' in out:
    raise ValueError(f'Prompt {template!r}: expected "{{0}} {{1}}" together.')
  return out


def parse_prompts_and_classes(text: str) -> PromptsAndClasses:
  """Parses the text of DreamBench's prompts_and_classes.txt.

  Layout: a 'Classes' section of `subject_name,class` lines, then 'Object
  Prompts' and 'Live Subject Prompts' sections whose lines start with a quoted
  template ('a {0} {1} in the jungle'.format(unique_token, class_token),).
  """
  class_nouns, prompts = {}, {'object': [], 'live': []}
  section = None
  for line in text.splitlines():
    line = line.strip()
    low = line.lower()
    if not line or low.startswith('subject_name'):
      continue
    if low == 'classes':
      section = 'classes'
    elif 'prompts' in low and 'object' in low:
      section = 'object'
    elif 'prompts' in low and 'live' in low:
      section = 'live'
    elif low == 'prompts':
      section = None
    elif section == 'classes' and ',' in line:
      name, noun = (s.strip() for s in line.split(',', 1))
      class_nouns[name] = noun
    elif section in prompts and (m := _QUOTED.match(line)):
      prompts[section].append(_normalize_template(m.group(2)))
  if not class_nouns or not prompts['object'] or not prompts['live']:
    raise ValueError(
        f'Not a DreamBench {PROMPTS_FILE}: found {len(class_nouns)} classes, '
        f'{len(prompts["object"])} object and {len(prompts["live"])} live '
        'prompts (want a "Classes" section and both prompt lists).')
  return PromptsAndClasses(class_nouns, tuple(prompts['object']),
                           tuple(prompts['live']))


def read_prompts_and_classes(path: os.PathLike[str] | str) -> PromptsAndClasses:
  return parse_prompts_and_classes(pathlib.Path(path).read_text())


def is_live(subject: str, class_noun: str | None = None) -> bool:
  """Live subjects (dogs, cats) get the live prompt list."""
  if subject in CLASS_NOUNS:
    return subject in LIVE_SUBJECTS
  return (class_noun or '') in _LIVE_CLASS_NOUNS


def prompt_templates(subject: str, *, live: bool | None = None
                     ) -> tuple[str, ...]:
  """The 25 '{}' templates of `subject` (or of any subject, given `live`)."""
  if live is None:
    if subject not in CLASS_NOUNS:
      raise ValueError(f'Unknown DreamBench subject {subject!r}; subjects: '
                       f'{", ".join(SUBJECTS)}.')
    live = is_live(subject)
  return LIVE_PROMPTS if live else OBJECT_PROMPTS


def prompts(subject: str, identifier: str = 'sks') -> list[str]:
  """The 25 evaluation prompts of `subject`, e.g. 'a sks dog in the jungle'."""
  templates = prompt_templates(subject)
  return common.format_prompts(templates, identifier, CLASS_NOUNS[subject])


# --- Source folders -----------------------------------------------------------
def find_root(path: os.PathLike[str] | str) -> pathlib.Path:
  """The folder holding `<subject>/` folders, in any of the accepted layouts."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f'DreamBench directory {path} does not exist.')
  candidates = [path / 'dataset', path, *sorted(path.glob('*/dataset'))]
  for c in candidates:
    if (c / PROMPTS_FILE).is_file():
      return c
  for c in candidates:  # No prompts file: any folder of known subjects.
    if any(common.list_images(c / s) for s in SUBJECTS):
      return c
  raise FileNotFoundError(
      f'No DreamBench data in {path}: expected <dir>/dataset/<subject>/*.jpg '
      f'with <dir>/dataset/{PROMPTS_FILE}, or <dir>/<subject>/*.jpg with '
      f'<dir>/{PROMPTS_FILE}.')


def read_source(root: pathlib.Path
                ) -> tuple[PromptsAndClasses, dict[str, list[pathlib.Path]]]:
  """(prompts and classes, subject -> image paths) of a `find_root` folder."""
  if (root / PROMPTS_FILE).is_file():
    pc = read_prompts_and_classes(root / PROMPTS_FILE)
  else:
    logging.warning('%s has no %s; using the built-in DreamBench classes.',
                    root, PROMPTS_FILE)
    pc = BUILTIN
  images = {}
  for folder in sorted(p for p in root.iterdir() if p.is_dir()):
    files = common.list_images(folder)
    if not files:
      continue
    if folder.name not in pc.class_nouns:
      logging.warning('Skipping %s: %r is not listed in %s.', folder,
                      folder.name, PROMPTS_FILE)
      continue
    images[folder.name] = files
  if not images:
    raise FileNotFoundError(f'No subject folders with images in {root}.')
  return pc, images


def scan(manual_dir: os.PathLike[str] | str) -> tuple[str, dict[str, int]]:
  """(source folder, subject -> image count) that a build would record."""
  root = find_root(manual_dir)
  _, images = read_source(root)
  return str(root), {s: len(f) for s, f in images.items()}


# --- TFDS builder -------------------------------------------------------------
class Dreambench(common.ArrayRecordBuilder):
  """DreamBench reference photos (DreamBooth's 30 subjects)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Optional (otherwise {ARCHIVE_URL} is downloaded). Place the DreamBench
  `dataset/` folder of github.com/google/dreambooth in manual_dir, as
  <manual_dir>/dataset/<subject>/*.jpg + <manual_dir>/dataset/{PROMPTS_FILE},
  or flat: <manual_dir>/<subject>/*.jpg + <manual_dir>/{PROMPTS_FILE}.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'Reference photos of the DreamBench subjects (DreamBooth, CVPR '
            '2023), 4-6 per subject, with class nouns and the 25 evaluation '
            'prompts per subject type in `metadata`. Images: Creative Commons '
            'Attribution 4.0; photographers are credited in '
            'references_and_licenses.txt, copied to attribution/ beside these '
            'files.'),
        features=common.subject_features(),
        # Keep file order: subject by subject, photos by name.
        disable_shuffling=True,
        homepage='https://github.com/google/dreambooth',
        citation=_CITATION,
        license='CC-BY-4.0 (images; see references_and_licenses.txt)',
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    try:
      manual_dir = dl_manager.manual_dir
    except AssertionError:  # No manual data: fetch the public repository.
      manual_dir = dl_manager.download_and_extract(ARCHIVE_URL)
    root = find_root(os.fspath(manual_dir))
    pc, images = read_source(root)
    # Upstream layout: the repository root above dataset/ holds its LICENSE.
    upstream = root.parent if root.name == 'dataset' else None
    copied = common.copy_files(
        common.find_attribution_files(root, upstream),
        self.data_path / common.ATTRIBUTION_DIR)
    self.info.metadata.update({
        'source': str(root),
        'subjects': sorted(images),
        'missing_subjects': [s for s in pc.class_nouns if s not in images],
        'class_nouns': pc.class_nouns,
        'object_prompts': list(pc.object_prompts),
        'live_prompts': list(pc.live_prompts),
        'attribution_files': [
            f'{common.ATTRIBUTION_DIR}/{p.name}' for p in copied],
        'subject_info': {
            s: _subject_info(s, pc, len(files)) for s, files in images.items()},
    })
    logging.info('DreamBench: %d of %d subjects in %s.', len(images),
                 len(pc.class_nouns), root)
    return {'train': self._generate_examples(pc, images)}

  def _generate_examples(self, pc, images):
    for subject, files in images.items():
      noun = pc.class_nouns[subject]
      for path in files:
        yield f'{subject}/{path.name}', {
            'image': common.image_for_tfds(path),
            'subject': subject,
            'class_noun': noun,
            'live': is_live(subject, noun),
            'filename': path.name,
        }


def _subject_info(subject: str, pc: PromptsAndClasses, num_images: int):
  live = is_live(subject, pc.class_nouns[subject])
  return {
      'class_noun': pc.class_nouns[subject],
      'live': live,
      'num_images': num_images,
      'prompts': list(pc.live_prompts if live else pc.object_prompts),
  }

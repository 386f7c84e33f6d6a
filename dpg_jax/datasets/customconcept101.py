"""CustomConcept101 (Custom Diffusion, Kumari et al. CVPR 2023): 101 concepts.

TFDS builder `custom_concept101` (array_record, no TensorFlow), built from a
manual download only (the images are on Google Drive, see the Custom Diffusion
repository's customconcept101/README.md). Expected `manual_dir` layout, as
released (`benchmark_dataset.zip` unzipped beside the repository's
`customconcept101/` files):

  <manual_dir>/dataset.json
  <manual_dir>/prompts/<name>.txt
  <manual_dir>/benchmark_dataset/<concept>/*.jpg   (3-15 photos per concept)

`dataset.json` is a list with one entry per concept, e.g.
  {"instance_prompt": "photo of a <new1> cat", "class_prompt": "cat",
   "instance_data_dir": "./benchmark_dataset/pet_cat1",
   "class_data_dir": "./regularization/pet_cat",
   "prompt_filename": "prompts/cat.txt"}
and each prompt file has one template per line (20 per concept) with a '{}'
slot for '<identifier> <class noun>', e.g. '{} swimming in a pool.'.

The parser is tolerant, and says what it skipped:
  * dataset.json may also sit in <manual_dir>/customconcept101/ (a checkout of
    the repository) with benchmark_dataset/ there or in <manual_dir>;
  * each path in an entry is tried relative to the json's folder, then to
    <manual_dir>, then by its base name under benchmark_dataset/ or prompts/;
  * concepts whose image folder is missing are skipped (recorded in
    `info.metadata['missing_subjects']`); a missing prompt file, no prompts;
  * the concept name is the base name of instance_data_dir ('pet_cat1'); the
    class noun is what follows the modifier token in instance_prompt ('<new1>
    dice plushie' -> 'dice plushie'), else class_prompt; live = pets and people.

Licenses (per the release): Unsplash images under the Unsplash License, the
authors' own photos CC BY-SA 4.0, flower images from Wikimedia/Flickr/Pixabay
(sources in urls.txt). An ATTRIBUTION.txt saying so, and any README / LICENSE /
urls.txt found in manual_dir, are written beside the built files
(attribution/).
"""
import json
import logging
import os
import pathlib
import re

import tensorflow_datasets as tfds

from dpg_jax.datasets import common

DATASET_JSON = 'dataset.json'
IMAGES_DIR = 'benchmark_dataset'
PROMPTS_DIR = 'prompts'

ATTRIBUTION = """\
CustomConcept101 (Kumari, Zhang, Zhang, Shechtman, Zhu: "Multi-Concept
Customization of Text-to-Image Diffusion", CVPR 2023),
https://github.com/adobe-research/custom-diffusion/tree/main/customconcept101
Images taken from Unsplash are under the Unsplash License
(https://unsplash.com/license). Images captured by the authors are released
under CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/). Flower
images were downloaded from Wikimedia/Flickr/Pixabay; their original sources
are listed at https://www.cs.cmu.edu/~custom-diffusion/assets/urls.txt.
"""

_CITATION = r"""@inproceedings{kumari2023multi,
  title={Multi-Concept Customization of Text-to-Image Diffusion},
  author={Kumari, Nupur and Zhang, Bingliang and Zhang, Richard and
          Shechtman, Eli and Zhu, Jun-Yan},
  booktitle={CVPR},
  year={2023}
}"""

_LIVE_PREFIXES = ('pet_', 'person_')
_LIVE_CLASS_NOUNS = frozenset(('cat', 'dog', 'person'))
_MODIFIER = re.compile(r'<[^>]+>\s*(.+?)[\s.]*$')


def find_json(manual_dir: os.PathLike[str] | str) -> pathlib.Path:
  manual_dir = pathlib.Path(manual_dir)
  if not manual_dir.is_dir():
    raise FileNotFoundError(
        f'CustomConcept101 directory {manual_dir} does not exist.')
  for path in (manual_dir / DATASET_JSON,
               manual_dir / 'customconcept101' / DATASET_JSON):
    if path.is_file():
      return path
  raise FileNotFoundError(
      f'No {DATASET_JSON} in {manual_dir} (or its customconcept101/): expected '
      f'<dir>/{DATASET_JSON}, <dir>/{PROMPTS_DIR}/*.txt and '
      f'<dir>/{IMAGES_DIR}/<concept>/*.jpg.')


def _resolve(value: str, bases, fallback_dirs) -> pathlib.Path | None:
  """First existing of: `value` under each base, its base name in fallbacks."""
  value = value.strip()
  candidates = [pathlib.Path(b) / value for b in bases]
  candidates += [pathlib.Path(d) / pathlib.PurePosixPath(value).name
                 for d in fallback_dirs]
  return next((c for c in candidates if c.exists()), None)


def read_prompt_file(path: os.PathLike[str] | str) -> list[str]:
  """Templates of one prompt file: one per line, '{}' for the subject."""
  templates = []
  for line in pathlib.Path(path).read_text().splitlines():
    line = line.strip()
    if not line or line.startswith('#'):
      continue
    line = line.replace('{0}', '{}')
    if line.count('{}') > 1 or re.search(r'\{[^}]', line):
      logging.warning('%s: skipping %r (one "{}" slot expected).', path, line)
      continue
    templates.append(line)
  return templates


def _class_noun(entry: dict) -> str:
  m = _MODIFIER.search(entry.get('instance_prompt', ''))
  noun = m.group(1) if m else entry.get('class_prompt', '')
  if not noun.strip():
    raise ValueError(f'{DATASET_JSON} entry without a class noun: {entry}')
  return noun.strip()


def read_source(manual_dir: os.PathLike[str] | str):
  """Parses a manual_dir.

  Returns:
    (json path, {concept: info dict}, {concept: image paths}, missing names).
  """
  manual_dir = pathlib.Path(manual_dir)
  json_path = find_json(manual_dir)
  entries = json.loads(json_path.read_text())
  if isinstance(entries, dict):  # Tolerate {"name": entry, ...}.
    entries = list(entries.values())
  if not isinstance(entries, list):
    raise ValueError(f'{json_path}: expected a list of concept entries.')
  bases = [json_path.parent, manual_dir]
  infos, images, missing = {}, {}, []
  for entry in entries:
    if 'instance_data_dir' not in entry:
      logging.warning('%s: skipping entry without instance_data_dir: %s',
                      json_path, entry)
      continue
    name = pathlib.PurePosixPath(entry['instance_data_dir'].strip()).name
    if name in infos or name in missing:
      logging.warning('%s: skipping duplicate concept %r.', json_path, name)
      continue
    folder = _resolve(entry['instance_data_dir'], bases,
                      [b / IMAGES_DIR for b in bases])
    files = common.list_images(folder) if folder else []
    if not files:
      logging.warning('CustomConcept101: no images for %r (%s); skipped.',
                      name, entry['instance_data_dir'])
      missing.append(name)
      continue
    templates = []
    if entry.get('prompt_filename'):
      prompt_file = _resolve(entry['prompt_filename'], bases,
                             [b / PROMPTS_DIR for b in bases])
      if prompt_file is None:
        logging.warning('CustomConcept101: prompt file %s of %r not found.',
                        entry['prompt_filename'], name)
      else:
        templates = read_prompt_file(prompt_file)
    noun = _class_noun(entry)
    infos[name] = {
        'class_noun': noun,
        'live': name.startswith(_LIVE_PREFIXES) or noun in _LIVE_CLASS_NOUNS,
        'num_images': len(files),
        'prompts': templates,
        'instance_prompt': entry.get('instance_prompt', ''),
        'class_prompt': entry.get('class_prompt', noun),
    }
    images[name] = files
  if not images:
    raise FileNotFoundError(
        f'No concept of {json_path} has images (looked under '
        f'{" and ".join(str(b / IMAGES_DIR) for b in bases)}).')
  return json_path, infos, images, missing


def scan(manual_dir: os.PathLike[str] | str) -> tuple[str, dict[str, int]]:
  """(source, concept -> image count) that a build would record."""
  json_path, _, images, _ = read_source(manual_dir)
  return str(json_path.parent), {s: len(f) for s, f in images.items()}


class CustomConcept101(common.ArrayRecordBuilder):
  """CustomConcept101 reference photos (101 concepts, 20 prompts each)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  From github.com/adobe-research/custom-diffusion, folder customconcept101:
  copy {DATASET_JSON} and {PROMPTS_DIR}/ into manual_dir and unzip
  benchmark_dataset.zip there (gdown 1jj8JMtIS5-8vRtNtZ2x8isieWH9yetuK), giving
  <manual_dir>/{DATASET_JSON}, <manual_dir>/{PROMPTS_DIR}/*.txt,
  <manual_dir>/{IMAGES_DIR}/<concept>/*.jpg.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            'CustomConcept101: 101 concepts with 3-15 reference photos each; '
            'class nouns and 20 evaluation prompts per concept in `metadata`.'
            '\n' + ATTRIBUTION),
        features=common.subject_features(),
        disable_shuffling=True,
        homepage='https://www.cs.cmu.edu/~custom-diffusion/dataset.html',
        citation=_CITATION,
        license=('Unsplash License / CC BY-SA 4.0 (see '
                 'attribution/ATTRIBUTION.txt)'),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    manual_dir = pathlib.Path(os.fspath(dl_manager.manual_dir))
    json_path, infos, images, missing = read_source(manual_dir)
    out = self.data_path / common.ATTRIBUTION_DIR
    copied = common.copy_files(
        [f for f in common.find_attribution_files(manual_dir, json_path.parent)
         if f.name != 'ATTRIBUTION.txt'], out)
    (out / 'ATTRIBUTION.txt').write_text(ATTRIBUTION)
    copied.append(out / 'ATTRIBUTION.txt')
    self.info.metadata.update({
        'source': str(json_path.parent),
        'subjects': list(images),
        'missing_subjects': missing,
        'attribution_files': [
            f'{common.ATTRIBUTION_DIR}/{p.name}' for p in copied],
        'subject_info': infos,
    })
    return {'train': self._generate_examples(infos, images)}

  def _generate_examples(self, infos, images):
    for name, files in images.items():
      for path in files:
        yield f'{name}/{path.name}', {
            'image': common.image_for_tfds(path),
            'subject': name,
            'class_noun': infos[name]['class_noun'],
            'live': infos[name]['live'],
            'filename': path.name,
        }

"""Building the subject datasets on first use and reading them back.

  from dpg_jax import datasets
  dog = datasets.load_subject('dog')  # builds `dreambench` if needed
  dog.images, dog.class_noun, dog.prompts('sks')

Random access and a grain pipeline over a built dataset (no TensorFlow):

  import grain
  import tensorflow_datasets as tfds
  source = tfds.data_source('dreambench', split='train', data_dir=data_dir)
  source[0]  # {'image': HWC uint8, 'subject': b'backpack_dog', ...}
  images = (grain.MapDataset.source(source)
            .filter(lambda ex: ex['subject'] == b'dog')
            .map(lambda ex: ex['image']))
  for image in images: ...

`data_dir=None` is TFDS's default (~/tensorflow_datasets). DreamBench's default
source is ../shared/data/dreambench beside the repository when present (5 of
the 30 subjects), else the public google/dreambooth archive.
"""
import logging
import os
import pathlib

import tensorflow_datasets as tfds

from dpg_jax.datasets import common
from dpg_jax.datasets import customconcept101
from dpg_jax.datasets import dreambench
from dpg_jax.datasets import subjects

DATASETS = {
    'dreambench': dreambench.Dreambench,
    'custom_concept101': customconcept101.CustomConcept101,
}
_SCANNERS = {
    'dreambench': dreambench.scan,
    'custom_concept101': customconcept101.scan,
}

PathLike = os.PathLike[str] | str


def default_dreambench_dir() -> pathlib.Path | None:
  """../shared/data/dreambench beside the repository root, if it exists."""
  repo_root = pathlib.Path(__file__).resolve().parents[2]
  path = repo_root.parent / 'shared' / 'data' / 'dreambench'
  return path if path.is_dir() else None


def _builder_class(dataset: str):
  if dataset not in DATASETS:
    raise ValueError(f'Unknown dataset {dataset!r}; datasets: '
                     f'{", ".join(DATASETS)}.')
  return DATASETS[dataset]


def _is_stale(builder, scanned: tuple[str, dict[str, int]]) -> bool:
  """Whether the scanned manual_dir differs from the built data."""
  source, counts = scanned
  metadata = builder.info.metadata or {}
  built = {s: i['num_images']
           for s, i in metadata.get('subject_info', {}).items()}
  return metadata.get('source') != source or built != counts


def prepare(dataset: str = 'dreambench', *, data_dir: PathLike | None = None,
            manual_dir: PathLike | None = None):
  """Builds `dataset` into `data_dir` unless already built; returns the builder.

  Args:
    dataset: 'dreambench' or 'custom_concept101'.
    data_dir: TFDS data_dir (None: TFDS's default).
    manual_dir: source folder (layouts in each builder's module docstring).
      Given, the dataset is rebuilt when it holds other subjects or photos
      than the built copy. None: use what is built, else DreamBench's
      default_dreambench_dir() or download.

  Returns:
    The tfds builder, prepared; `info.metadata['subjects']` lists its subjects.
  """
  cls = _builder_class(dataset)
  if manual_dir is not None:
    manual_dir = pathlib.Path(manual_dir).expanduser().resolve()
    if not manual_dir.is_dir():
      raise FileNotFoundError(
          f'manual_dir {manual_dir} of dataset {dataset!r} does not exist.')
    # Fails early, with the expected layout, on a folder the builder can't use.
    scanned = _SCANNERS[dataset](manual_dir)
  builder = cls(data_dir=data_dir)
  mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  if builder.is_prepared():
    if manual_dir is None or not _is_stale(builder, scanned):
      return builder
    logging.info('Rebuilding %s from %s (its contents changed).', dataset,
                 manual_dir)
    mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
  elif manual_dir is None and dataset == 'dreambench':
    manual_dir = default_dreambench_dir()
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=None if manual_dir is None else os.fspath(manual_dir),
          download_mode=mode,
          try_download_gcs=False,
          compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return cls(data_dir=data_dir)  # Fresh info, read back from disk.


def data_source(dataset: str = 'dreambench', *, split: str = 'train',
                data_dir: PathLike | None = None,
                manual_dir: PathLike | None = None, **kwargs):
  """`tfds.data_source` of `dataset`, built first if needed."""
  builder = prepare(dataset, data_dir=data_dir, manual_dir=manual_dir)
  return tfds.data_source(builder.name, split=split,
                          data_dir=builder.data_dir_root, download=False,
                          **kwargs)


def available_subjects(dataset: str = 'dreambench', *,
                       data_dir: PathLike | None = None,
                       manual_dir: PathLike | None = None) -> list[str]:
  if dataset == 'toyworld':  # rendered by the toy world's generator: nothing to build
    from dpg_jax.toyworld import subjects as toy_subjects  # pylint: disable=g-import-not-at-top
    return [s.name for s in toy_subjects.SUBJECTS]
  builder = prepare(dataset, data_dir=data_dir, manual_dir=manual_dir)
  return list(builder.info.metadata.get('subjects', []))


def _unknown_subject(name: str, dataset: str, metadata) -> ValueError:
  available = ', '.join(metadata.get('subjects', [])) or 'none'
  source = metadata.get('source', '?')
  if name in metadata.get('missing_subjects', ()) or (
      dataset == 'dreambench' and name in dreambench.SUBJECTS):
    return ValueError(
        f'Subject {name!r} belongs to {dataset} but its photos were not in '
        f'{source}; the built dataset has: {available}. Pass a manual_dir '
        'that holds it.')
  return ValueError(f'Unknown subject {name!r} in dataset {dataset!r} '
                    f'(built from {source}); available: {available}.')


def load_subject(name: str, *, dataset: str = 'dreambench',
                 data_dir: PathLike | None = None,
                 manual_dir: PathLike | None = None) -> subjects.Subject:
  """One subject of a dataset, building the dataset first if needed.

  Args:
    name: subject name, e.g. 'dog' (DreamBench) or 'pet_cat1' (CC101).
    dataset: 'dreambench', 'custom_concept101' or 'toyworld'.
    data_dir: TFDS data_dir (None: TFDS's default).
    manual_dir: source folder, see `prepare`.

  Returns:
    The Subject, its images read through `tfds.data_source` ('toyworld':
    rendered by the toy world's generator, no build needed).
  """
  if dataset == 'toyworld':
    from dpg_jax.toyworld import subjects as toy_subjects  # pylint: disable=g-import-not-at-top
    return toy_subjects.subject(name)
  builder = prepare(dataset, data_dir=data_dir, manual_dir=manual_dir)
  metadata = builder.info.metadata
  infos = metadata.get('subject_info', {})
  if name not in infos:
    raise _unknown_subject(name, dataset, metadata)
  info = infos[name]
  # Images stay encoded while looking for the subject's records.
  source = tfds.data_source(
      builder.name, split='train', data_dir=builder.data_dir_root,
      download=False, decoders={'image': tfds.decode.SkipDecoding()})
  # Records keep generation order (disable_shuffling): try the subject's
  # range first, and scan everything if that assumption ever fails.
  order = list(metadata['subjects'])
  start = sum(infos[s]['num_images'] for s in order[:order.index(name)])
  records = [source[i] for i in range(start, start + info['num_images'])]
  if any(common.as_str(r['subject']) != name for r in records):
    records = [r for r in (source[i] for i in range(len(source)))
               if common.as_str(r['subject']) == name]
  image_feature = builder.info.features['image']
  return subjects.Subject(
      name=name,
      class_noun=info['class_noun'],
      live=bool(info['live']),
      images=tuple(image_feature.decode_example_np(r['image'])
                   for r in records),
      filenames=tuple(common.as_str(r['filename']) for r in records),
      prompt_templates=tuple(info['prompts']),
      dataset=dataset,
      attribution_files=tuple(
          os.fspath(builder.data_path / f)
          for f in metadata.get('attribution_files', ())),
  )

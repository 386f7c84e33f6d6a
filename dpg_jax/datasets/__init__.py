"""Subject datasets: DreamBench, CustomConcept101 and the user's own folders.

Importing this package registers the TFDS builders `dreambench` and
`custom_concept101` (array_record; built and read without TensorFlow), so
`tfds.data_source('dreambench', data_dir=...)` works once they are built.
"""
from dpg_jax.datasets import customconcept101
from dpg_jax.datasets import dreambench
from dpg_jax.datasets.loading import available_subjects
from dpg_jax.datasets.loading import data_source
from dpg_jax.datasets.loading import DATASETS
from dpg_jax.datasets.loading import default_dreambench_dir
from dpg_jax.datasets.loading import load_subject
from dpg_jax.datasets.loading import prepare
from dpg_jax.datasets.subjects import Subject

"""Shared pytest fixtures: a tiny random-init Stable Diffusion, built once."""
import os

# Tests are sized for CPU; set before jax initialises its backend.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Test models are tiny, so XLA:CPU compile time dominates. Level 1 compiles
# the tiny train step ~1.5x faster than the default (16 s vs 23 s on 2 cores)
# and still runs it at ~0.1 s/step; level 0 compiles in 10 s but runs 13x
# slower, which loses as soon as a test takes a few dozen steps.
os.environ.setdefault(
    'XLA_FLAGS', '--xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true')

import jax  # pylint: disable=g-import-not-at-top,g-bad-import-order
import pytest  # pylint: disable=g-import-not-at-top,g-bad-import-order

# Many tests compile the very same programs (the tiny train step, the sampler):
# a persistent cache, shared by xdist workers, compiles each once per machine.
jax.config.update('jax_compilation_cache_dir', os.environ.get(
    'DPG_TEST_XLA_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'dpg_jax_test_xla')))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


@pytest.fixture(scope='session')
def tiny_sd_dir(tmp_path_factory):
  """Path of a tiny SD (dpg_jax.tiny 'tiny' spec, seed 0) in diffusers layout."""
  from dpg_jax import tiny  # pylint: disable=g-import-not-at-top
  return tiny.build_tiny_sd(str(tmp_path_factory.mktemp('tiny_sd') / 'sd'))


@pytest.fixture(scope='session')
def tiny_sd(tiny_sd_dir):
  """(StableDiffusion, params) of `tiny_sd_dir`, fp32."""
  from dpg_jax import models  # pylint: disable=g-import-not-at-top
  return models.load_stable_diffusion(tiny_sd_dir)

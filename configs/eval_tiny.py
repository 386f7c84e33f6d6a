"""The evaluation driver end to end in a few minutes on 2 CPU cores (no network).

Methods 'tiny' and 'tiny_dpg' (the shipped toy-world SD, 64 px, 30 steps), 2
subjects (dog and robot_toy from ../shared/data/dreambench if present, else 2
synthetic subjects), 2 prompts, 2 images per prompt, tiny random DINO / CLIP
built in the workdir. The toy SD knows neither dogs nor DreamBench's photos and
the encoders are random, so the numbers mean nothing; the pipeline is the real one.

  python -m dpg_jax.evaluate --config=configs/eval_tiny.py --workdir=/tmp/dpg_eval_tiny
"""
from configs import eval_dreambench
from dpg_jax.datasets import loading


def get_config():
  c = eval_dreambench.get_config()
  c.methods = ('tiny', 'tiny_dpg')
  c.train.num_steps = 30
  c.train.checkpoint_every = 30
  c.train.sample_every = 0
  c.train.export = True
  shared = loading.default_dreambench_dir()
  if shared is not None:
    c.dataset_dir = str(shared)
    c.subjects = ('dog', 'robot_toy')   # one live subject, one object
  else:
    c.synthetic_subjects = 2
  c.prompts_limit = 2
  c.images_per_prompt = 2
  c.seed = 0
  # The tiny configs' preview settings: the same compiled sampler (cache hit).
  c.sample.scheduler = 'ddim'
  c.sample.num_inference_steps = 10
  c.sample.guidance_scale = 3.0
  c.sample.batch_size = 8
  c.scorer.tiny = True
  c.scorer.batch_size = 8
  return c

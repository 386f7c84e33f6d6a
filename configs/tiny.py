"""The embedded default: tiny random-init SD, a synthetic subject, no network.

Builds everything it needs under --workdir and finishes in a few minutes on
2 CPU cores (model build, class images, training, checkpoints, samples, export):

  python -m dpg_jax.main --config=configs/tiny.py --workdir=/tmp/dpg_tiny
"""
from configs import default


def get_config():
  c = default.get_config()
  c.model.pretrained = ''          # '' + model.tiny: <workdir>/pretrained_tiny
  c.model.tiny = 'tiny'
  c.data.synthetic = True
  c.data.identifier = 'sks'
  c.data.class_noun = 'toy'
  c.data.resolution = 64
  c.data.num_class_images = 8
  c.data.class_sample_steps = 10
  c.data.class_guidance_scale = 3.0
  c.num_steps = 300
  c.batch_size = 2
  c.learning_rate = 1e-4           # random-init models learn visibly at this rate
  c.warmup_steps = 10
  c.sample.num_images_per_prompt = 2
  c.sample.num_inference_steps = 10
  c.sample.guidance_scale = 3.0
  c.log_every = 10
  c.checkpoint_every = 100
  c.sample_every = 150
  return c

"""The embedded default: the shipped toy-world SD learns a toy subject, no network.

Starts from the toy Stable Diffusion pretrained on the procedural toy world
and shipped in the package (dpg_jax/toyworld/, README "The toy world"), and
personalizes it on the toy subject `orange_star` (an orange star with purple
stripes and one eye, a combination the base model never saw). Finishes in a
few minutes on 2 CPU cores (class images, training, checkpoints, samples,
export); the previews show the subject in the prompts' contexts:

  python -m dpg_jax.main --config=configs/tiny.py --workdir=/tmp/dpg_tiny

`--config.model.tiny=tiny --config.model.pretrained=` trains the tiny random
SD instead (what the unit tests use for speed).
"""
from configs import default
from dpg_jax.toyworld import weights


def get_config():
  c = default.get_config()
  c.model.pretrained = weights.BASE_DIR   # the shipped toy-world base model
  c.model.tiny = ''
  c.data.synthetic = True                 # the toy subject orange_star
  c.data.identifier = 'sks'
  c.data.class_noun = 'star'
  c.data.resolution = 64
  c.data.num_class_images = 8
  c.data.class_sample_steps = 10
  c.data.class_guidance_scale = 3.0
  c.num_steps = 300
  c.batch_size = 2
  c.learning_rate = 1e-4
  c.warmup_steps = 10
  c.sample.prompts = ('a {identifier} {class_noun} on the grass',
                      'a {identifier} {class_noun} in the snow',
                      'a {identifier} {class_noun} at night',
                      'a {identifier} {class_noun} next to a red ring')
  c.sample.num_images_per_prompt = 2
  c.sample.num_inference_steps = 10
  c.sample.guidance_scale = 3.0
  c.log_every = 10
  c.checkpoint_every = 100
  c.sample_every = 150
  return c

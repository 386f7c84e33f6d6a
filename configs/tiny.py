"""The embedded default: the shipped toy-world SD learns a toy subject, offline.

The base model is the toy-world Stable Diffusion pretrained by the project and
shipped in the package (`model.pretrained='toyworld'`, see the README's toy
world section); the subject is the toy world's `orange_star` (an orange star
with purple stripes and an eye, a combination pretraining never showed). Builds
what else it needs under --workdir and finishes in a few minutes on 2 CPU
cores (class images, training, checkpoints, previews, export):

  python -m dpg_jax.main --config=configs/tiny.py --workdir=/tmp/dpg_tiny

`--config.model.pretrained= --config.model.tiny=tiny` swaps in the random
tiny SD of `dpg_jax.tiny` (what the unit tests use: fast, meaningless output).
"""
from configs import default


def get_config():
  c = default.get_config()
  c.model.pretrained = 'toyworld'  # '' + model.tiny: a random tiny SD in <workdir>/pretrained_tiny
  c.model.tiny = ''
  c.data.synthetic = True          # the toy world's orange_star, 5 photos
  c.data.identifier = 'sks'
  c.data.class_noun = 'star'
  # Toy-world captions read 'a <colour> <class> <context>': the identifier
  # takes the colour's place, the class prompt is the class alone.
  c.data.instance_prompt = 'a {identifier} {class_noun}'
  c.data.class_prompt = 'a {class_noun}'
  c.data.resolution = 64
  c.data.num_class_images = 8
  c.data.class_sample_steps = 10
  c.data.class_guidance_scale = 3.0
  c.num_steps = 300
  c.batch_size = 2
  c.learning_rate = 1e-4
  c.warmup_steps = 10
  c.sample.prompts = ('a {identifier} {class_noun} in the snow',
                      'a {identifier} {class_noun} on the grass',
                      'a {identifier} {class_noun} at night')
  c.sample.num_images_per_prompt = 2
  c.sample.num_inference_steps = 10
  c.sample.guidance_scale = 3.0
  c.log_every = 10
  c.checkpoint_every = 100
  c.sample_every = 150
  return c

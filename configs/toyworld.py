"""DreamBooth of a toy subject on the toy-world SD (`model.pretrained='toyworld'`).

What configs/tiny.py becomes once the toy-world base ships in the package (see
the README's toy world section); until then, build it first:

  python -m dpg_jax.toyworld.pretrain --workdir=/tmp/toyworld --out=dpg_jax/toyworld/shipped
  python -m dpg_jax.main --config=configs/toyworld.py --workdir=/tmp/dpg_toy

The subject is the toy world's `orange_star` (an orange star with purple
stripes and an eye, a combination pretraining never showed).
"""
from configs import tiny


def get_config():
  c = tiny.get_config()
  c.model.pretrained = 'toyworld'
  c.model.tiny = ''
  c.data.class_noun = 'star'
  # Toy-world captions read 'a <colour> <class> <context>': the identifier
  # takes the colour's place, the class prompt is the class alone.
  c.data.instance_prompt = 'a {identifier} {class_noun}'
  c.data.class_prompt = 'a {class_noun}'
  c.sample.prompts = ('a {identifier} {class_noun} in the snow',
                      'a {identifier} {class_noun} on the grass',
                      'a {identifier} {class_noun} at night')
  return c

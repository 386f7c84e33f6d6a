"""The toy subjects: fixed toy-world instances to personalize on, read like DreamBench.

Each subject is a (class, body colour, pattern) of `world.HELD_OUT` (never
drawn or named together in pretraining) with its own pattern colour and mark,
photographed 5 times in varied poses and contexts. `orange_star` is the
embedded default's subject (`data.synthetic`).

  subject('orange_star')          # a dpg_jax.datasets.Subject, rendered in memory
  write_dreambench(folder)        # <folder>/<name>/NN.png + prompts_and_classes.txt
                                  # + subjects.json (the attributes, for the judge)
"""
import dataclasses
import json
import os

import numpy as np

from dpg_jax.toyworld import world


@dataclasses.dataclass(frozen=True)
class ToySubject:
  name: str
  cls: str
  colour: str
  pattern: str
  secondary: str
  mark: str

  @property
  def attributes(self) -> dict:
    """{judge head: value} of what makes this subject itself (not its class)."""
    return {'cls': self.cls, 'colour': self.colour, 'pattern': self.pattern,
            'secondary': self.secondary, 'mark': self.mark}


SUBJECTS = tuple(ToySubject(f'{c}_{k}', k, c, p, s, m) for (k, c, p), s, m in zip(
    world.HELD_OUT[:8],
    ('purple', 'yellow', 'red', 'white', 'orange', 'yellow', 'blue', 'white'),
    ('eye', 'band', 'band', 'eye', 'eye', 'band', 'band', 'eye')))
BY_NAME = {s.name: s for s in SUBJECTS}
DEFAULT = 'orange_star'   # the former synthetic "striped star toy"
NUM_PHOTOS = 5

# '{}' stands for '<identifier> <class noun>', as in DreamBench.
PROMPT_TEMPLATES = tuple(f'a {{}} {world.CONTEXT_PHRASES[c]}' for c in world.CONTEXTS) + (
    'a {} next to a red ring',
    'a {} next to a blue mug',
    'a {} next to a yellow star',
    'a {} next to a green house',
    'a {} in the snow next to a white heart',
    'a {} at night next to an orange robot',
    'a photo of a {}',
)


def get(name: str) -> ToySubject:
  if name not in BY_NAME:
    raise ValueError(f'Unknown toy subject {name!r}; toy subjects: {", ".join(BY_NAME)}.')
  return BY_NAME[name]


def photo_scene(subject: ToySubject, index: int, seed: int = 0) -> world.Scene:
  """Photo `index` of a subject: its identity fixed, pose and context varied."""
  rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5B7, SUBJECTS.index(subject), index])
  pose = world.sample_scene(rng, neighbour_prob=0.0, allow_held_out=True)
  context = world.CONTEXTS[(index + SUBJECTS.index(subject)) % len(world.CONTEXTS)]
  return dataclasses.replace(pose, cls=subject.cls, colour=subject.colour,
                             pattern=subject.pattern, secondary=subject.secondary,
                             mark=subject.mark, context=context)


def photos(name: str, num: int = NUM_PHOTOS, resolution: int = 64, seed: int = 0):
  """uint8 [num, R, R, 3] photos of subject `name`."""
  s = get(name)
  ss = 2 if resolution < 256 else 1
  return np.stack([world.render(photo_scene(s, i, seed), resolution, ss) for i in range(num)])


def subject(name: str, resolution: int = 64):
  """The subject as a `dpg_jax.datasets.Subject` (what DreamBench subjects are)."""
  from dpg_jax.datasets import subjects as subjects_lib  # pylint: disable=g-import-not-at-top
  s = get(name)
  imgs = photos(name, resolution=resolution)
  return subjects_lib.Subject(
      name=name, class_noun=s.cls, live=False, images=tuple(imgs),
      filenames=tuple(f'{i:02d}.png' for i in range(len(imgs))),
      prompt_templates=PROMPT_TEMPLATES, dataset='toyworld')


def write_dreambench(folder, resolution: int = 64) -> str:
  """All toy subjects in DreamBench's flat layout; returns `folder`.

  <folder>/<subject>/NN.png, prompts_and_classes.txt (DreamBench's format:
  'subject_name,class' lines, then the prompt list), subjects.json (each
  subject's attributes, for the judge).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  for s in SUBJECTS:
    d = os.path.join(folder, s.name)
    os.makedirs(d, exist_ok=True)
    for i, img in enumerate(photos(s.name, resolution=resolution)):
      Image.fromarray(img).save(os.path.join(d, f'{i:02d}.png'))
  lines = ['Classes', 'subject_name,class'] + [f'{s.name},{s.cls}' for s in SUBJECTS]
  lines += ['', 'Prompts', 'prompt_list = ['] + [
      f"'{t.format('{0} {1}')}'," for t in PROMPT_TEMPLATES] + [']']
  with open(os.path.join(folder, 'prompts_and_classes.txt'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(os.path.join(folder, 'subjects.json'), 'w') as f:
    json.dump({s.name: s.attributes for s in SUBJECTS}, f, indent=1)
  return folder

"""The toy world: a deterministic generator of captioned, labelled scenes.

A scene is one object of `CLASSES` with a body colour, a pattern in a second
colour, an optional mark (an eye or a band) and a pose (position, scale,
rotation), in one of `CONTEXTS`, optionally next to a second, small object.
`render(scene, resolution)` draws it (supersampled, so edges are
anti-aliased); `caption(scene, rng)` names some or all of its attributes
("a red star with blue stripes on the grass"); `labels(scene)` are the
judge's targets. Everything is a pure function of its seed.

`HELD_OUT` (class, body colour, pattern) triples are never drawn by
`sample_scene` (so never shown or named together in pretraining): the toy
subjects are made of them, and the base model's compositional check prompts
for them.
"""
import dataclasses

import numpy as np

CLASSES = ('star', 'heart', 'ring', 'house', 'robot', 'mug')
COLOURS = ('red', 'orange', 'yellow', 'green', 'blue', 'purple', 'white')
PATTERNS = ('solid', 'striped', 'dotted', 'checked')
MARKS = ('none', 'eye', 'band')
CONTEXTS = ('grass', 'snow', 'water', 'brick', 'night', 'beach')

RGB = {
    'red': (0.86, 0.12, 0.12), 'orange': (0.96, 0.55, 0.10),
    'yellow': (0.97, 0.86, 0.15), 'green': (0.15, 0.68, 0.22),
    'blue': (0.15, 0.35, 0.90), 'purple': (0.50, 0.16, 0.66),
    'white': (0.96, 0.96, 0.94),
}
# How a caption names each part.
PATTERN_NOUNS = {'striped': 'stripes', 'dotted': 'dots', 'checked': 'checks'}
MARK_PHRASES = {'eye': 'with an eye', 'band': 'with a band'}
CONTEXT_PHRASES = {
    'grass': 'on the grass', 'snow': 'in the snow', 'water': 'on the water',
    'brick': 'by a brick wall', 'night': 'at night', 'beach': 'on the beach',
}

# (class, body colour, pattern) never drawn in pretraining; the first eight
# are the toy subjects' (subjects.py), the rest only held-out test prompts.
HELD_OUT = (
    ('star', 'orange', 'striped'), ('heart', 'blue', 'dotted'),
    ('ring', 'yellow', 'checked'), ('house', 'red', 'striped'),
    ('robot', 'green', 'dotted'), ('mug', 'purple', 'checked'),
    ('star', 'white', 'dotted'), ('heart', 'green', 'striped'),
    ('ring', 'purple', 'solid'), ('house', 'blue', 'solid'),
    ('robot', 'orange', 'solid'), ('mug', 'yellow', 'striped'),
)
_HELD_OUT = frozenset(HELD_OUT)

_RIM = np.array((0.10, 0.07, 0.06))
_PUPIL = np.array((0.05, 0.05, 0.08))


@dataclasses.dataclass(frozen=True)
class Scene:
  """Everything `render` draws and `caption`/`labels` name."""
  cls: str
  colour: str
  secondary: str            # the pattern's colour (unused when solid)
  pattern: str
  mark: str
  context: str
  x: float                  # centre in [-1, 1] image coordinates
  y: float
  scale: float              # object radius / half the image size
  angle: float              # radians
  bg_seed: int              # the context's own randomness (texture, light)
  neighbour: tuple | None = None  # (class, colour) of a small second object


def sample_scene(rng: np.random.Generator, *, neighbour_prob: float = 0.25,
                 allow_held_out: bool = False) -> Scene:
  """A random scene; never one of HELD_OUT unless `allow_held_out`."""
  while True:
    cls = CLASSES[rng.integers(len(CLASSES))]
    colour = COLOURS[rng.integers(len(COLOURS))]
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    if allow_held_out or (cls, colour, pattern) not in _HELD_OUT:
      break
  secondary = COLOURS[(COLOURS.index(colour) + 1 + rng.integers(len(COLOURS) - 1))
                      % len(COLOURS)]
  mark = MARKS[rng.integers(len(MARKS))]
  context = CONTEXTS[rng.integers(len(CONTEXTS))]
  neighbour = None
  if rng.uniform() < neighbour_prob:
    neighbour = (CLASSES[rng.integers(len(CLASSES))], COLOURS[rng.integers(len(COLOURS))])
  scale = rng.uniform(0.5, 0.7) if neighbour is None else rng.uniform(0.4, 0.5)
  margin = 0.95 - scale
  x, y = rng.uniform(-margin, margin, 2) * (0.6 if neighbour is not None else 1.0)
  return Scene(cls=cls, colour=colour, secondary=secondary, pattern=pattern, mark=mark,
               context=context, x=float(x), y=float(y), scale=float(scale),
               angle=float(rng.uniform(-0.5, 0.5)), bg_seed=int(rng.integers(2**31)),
               neighbour=neighbour)


def caption(scene: Scene, rng: np.random.Generator | None = None, *,
            keep: float = 0.8) -> str:
  """The scene's caption; with `rng`, each optional part is named with prob `keep`.

  The class is always named. Without `rng` every attribute is named.
  """
  named = (lambda: True) if rng is None else (lambda: rng.uniform() < keep)
  words = ['a']
  if named():
    words.append(scene.colour)
  words.append(scene.cls)
  if scene.pattern != 'solid' and named():
    words += ['with', scene.secondary, PATTERN_NOUNS[scene.pattern]]
  if scene.mark != 'none' and named():
    words.append(MARK_PHRASES[scene.mark])
  if named():
    words.append(CONTEXT_PHRASES[scene.context])
  if scene.neighbour is not None and named():
    words += ['next to a', scene.neighbour[1], scene.neighbour[0]]
  return with_articles(' '.join(words))


def with_articles(text: str) -> str:
  """'a' -> 'an' before a vowel ('an orange star', 'with an eye')."""
  words = text.split(' ')
  return ' '.join('an' if w == 'a' and i + 1 < len(words) and words[i + 1][:1] in 'aeiou'
                  else w for i, w in enumerate(words))


# The judge's heads: name -> the values it tells apart.
LABELS = {'cls': CLASSES, 'colour': COLOURS, 'secondary': COLOURS, 'pattern': PATTERNS,
          'mark': MARKS, 'context': CONTEXTS}


def labels(scene: Scene) -> dict:
  """{head: int} of the judge's targets (secondary is only meaningful if patterned)."""
  return {k: LABELS[k].index(getattr(scene, k)) for k in LABELS}


# --------------------------------------------------------------------------- #
# Drawing
# --------------------------------------------------------------------------- #
def _smooth(rng, n, cells):
  """[n, n] smooth noise in [0, 1]: bilinear upsampling of a coarse grid."""
  g = rng.uniform(0, 1, (cells + 1, cells + 1))
  t = np.linspace(0, cells, n, endpoint=False)
  i = np.minimum(t.astype(int), cells - 1)
  f = t - i
  rows = g[i] * (1 - f)[:, None] + g[i + 1] * f[:, None]
  return rows[:, i] * (1 - f)[None] + rows[:, i + 1] * f[None]


def _background(context, rng, xx, yy):
  """[n, n, 3] float background of a context (x right, y down, both in [-1, 1])."""
  n = xx.shape[0]
  noise = _smooth(rng, n, 6)[..., None]
  if context == 'grass':
    blades = 0.5 + 0.5 * np.sin(xx * rng.uniform(12, 16) + 3 * noise[..., 0])
    base = np.array((0.22, 0.55, 0.18)) * (0.75 + 0.35 * noise)
    out = base * (0.85 + 0.2 * blades[..., None])
  elif context == 'snow':
    out = np.array((0.88, 0.91, 0.96)) * (0.9 + 0.12 * noise)
    flakes = _smooth(rng, n, 10) > 0.86
    out = np.where(flakes[..., None], 1.0, out)
  elif context == 'water':
    waves = 0.5 + 0.5 * np.sin(yy * rng.uniform(8, 11) + 2.5 * np.sin(xx * 5 + 6 * noise[..., 0]))
    out = np.array((0.10, 0.36, 0.62)) * (0.8 + 0.35 * waves[..., None])
  elif context == 'brick':
    rows = np.floor((yy + 1) * 5)
    shift = (rows % 2) * 0.5
    col = (xx + 1) * 3 + shift
    mortar = ((((yy + 1) * 5) % 1) < 0.14) | (((col % 1)) < 0.07)
    out = np.array((0.62, 0.26, 0.17)) * (0.85 + 0.25 * noise)
    out = np.where(mortar[..., None], np.array((0.78, 0.76, 0.70)), out)
  elif context == 'night':
    out = np.array((0.04, 0.05, 0.18)) * (0.8 + 0.5 * (1 - (yy[..., None] + 1) / 2))
    stars = _smooth(rng, n, 12) > 0.88
    out = np.where(stars[..., None], np.array((0.95, 0.95, 0.8)), out)
  elif context == 'beach':
    horizon = rng.uniform(-0.6, -0.3)
    sea = np.array((0.25, 0.55, 0.80)) * (0.9 + 0.2 * noise)
    sand = np.array((0.90, 0.80, 0.55)) * (0.9 + 0.15 * noise)
    out = np.where((yy < horizon)[..., None], sea, sand)
  else:
    raise ValueError(f'unknown context {context!r}; expected one of {CONTEXTS}.')
  return out


def _shape(cls, u, v):
  """(inside, signed distance-like margin) of a class in object coordinates.

  u right, v down, the object fits the unit disc. The margin (> 0 inside) lets
  the caller draw a rim of constant width.
  """
  r, th = np.hypot(u, v), np.arctan2(v, u)
  if cls == 'star':
    # Five sharp points, one pointing up.
    k = np.abs(((th + np.pi / 2) % (2 * np.pi / 5)) - np.pi / 5) / (np.pi / 5)
    radius = 0.45 + 0.5 * k ** 1.6
    d = radius - r
  elif cls == 'heart':
    x, y = u * 1.2, -v * 1.2 + 0.15
    d = -((x * x + y * y - 1) ** 3 - x * x * y ** 3) * 0.6
  elif cls == 'ring':
    d = 0.18 - np.abs(r - 0.68)
  elif cls == 'house':
    wall = np.minimum(0.6 - np.abs(u), np.minimum(v + 0.05, 0.82 - v))
    roof = np.minimum(0.85 * (v + 0.9) / 0.95 - np.abs(u), np.minimum(0.05 - v, v + 0.9))
    d = np.maximum(wall, roof)
  elif cls == 'robot':
    body = np.minimum(0.5 - np.abs(u), 0.42 - np.abs(v - 0.38))
    head = np.minimum(0.36 - np.abs(u), 0.26 - np.abs(v + 0.35))
    antenna = np.minimum(0.06 - np.abs(u), 0.16 - np.abs(v + 0.74))
    knob = 0.1 - np.hypot(u, v + 0.9)
    d = np.maximum(np.maximum(body, head), np.maximum(antenna, knob))
  elif cls == 'mug':
    cup = np.minimum(0.5 - np.abs(u + 0.15), 0.7 - np.abs(v))
    handle = 0.09 - np.abs(np.hypot(u - 0.38, v) - 0.3)
    d = np.maximum(cup, np.where(u > 0.3, handle, -1.0))
  else:
    raise ValueError(f'unknown class {cls!r}; expected one of {CLASSES}.')
  return d > 0, d


def _pattern(pattern, u, v):
  """Where the secondary colour goes, in object coordinates."""
  if pattern == 'solid':
    return np.zeros(u.shape, bool)
  if pattern == 'striped':
    # Coarse on purpose: one period spans about 8 px (two latent cells of the x4 VAE).
    return np.floor((u + 0.5 * v) * 2.2 + 10) % 2 == 0
  if pattern == 'dotted':
    fu, fv = (u * 2.0 + 0.5) % 1 - 0.5, (v * 2.0 + 0.5) % 1 - 0.5
    return np.hypot(fu, fv) < 0.3
  if pattern == 'checked':
    return (np.floor(u * 2.0 + 10) + np.floor(v * 2.0 + 10)) % 2 == 0
  raise ValueError(f'unknown pattern {pattern!r}; expected one of {PATTERNS}.')


def _draw_object(out, xx, yy, *, cls, colour, secondary, pattern, mark, x, y, scale, angle):
  """Draws one object into `out` in place, inside its bounding box only (speed)."""
  n = out.shape[0]
  lo = lambda c: max(0, int((c - 1.05 * scale + 1) / 2 * n))
  hi = lambda c: min(n, int((c + 1.05 * scale + 1) / 2 * n) + 1)
  box = (slice(lo(y), hi(y)), slice(lo(x), hi(x)))
  xx, yy, view = xx[box], yy[box], out[box]
  dx, dy = (xx - x) / scale, (yy - y) / scale
  u = np.cos(angle) * dx + np.sin(angle) * dy
  v = -np.sin(angle) * dx + np.cos(angle) * dy
  inside, d = _shape(cls, u, v)
  colour_img = np.where(_pattern(pattern, u, v)[..., None], np.array(RGB[secondary]),
                        np.array(RGB[colour]))
  colour_img = colour_img * (1.08 - 0.14 * (u + v))[..., None]  # light from the top left
  if mark == 'band':
    colour_img = np.where((np.abs(v - 0.12) < 0.1)[..., None], _RIM * 2, colour_img)
  elif mark == 'eye':
    eye = np.hypot(u + 0.05, v + 0.12)
    colour_img = np.where((eye < 0.2)[..., None], np.array((0.98, 0.98, 0.95)), colour_img)
    colour_img = np.where((eye < 0.09)[..., None], _PUPIL, colour_img)
  colour_img = np.where((d < 0.07 / max(scale * 2, 0.4))[..., None], _RIM, colour_img)
  view[...] = np.where(inside[..., None], colour_img, view)


def render(scene: Scene, resolution: int = 64, supersample: int = 2) -> np.ndarray:
  """uint8 [R, R, 3] image of `scene` (anti-aliased by supersampling)."""
  n = resolution * supersample
  coords = (np.arange(n) + 0.5) / n * 2 - 1
  yy, xx = np.meshgrid(coords, coords, indexing='ij')
  rng = np.random.default_rng(scene.bg_seed)
  out = _background(scene.context, rng, xx, yy)
  if scene.neighbour is not None:
    # In the corner farthest from the main object.
    nx = -0.62 if scene.x > 0 else 0.62
    ny = 0.58 if scene.y < 0.2 else -0.58
    ncls, ncol = scene.neighbour
    _draw_object(out, xx, yy, cls=ncls, colour=ncol, secondary=ncol, pattern='solid',
                       mark='none', x=nx, y=ny, scale=0.28, angle=0.0)
  _draw_object(out, xx, yy, cls=scene.cls, colour=scene.colour, secondary=scene.secondary,
                     pattern=scene.pattern, mark=scene.mark, x=scene.x, y=scene.y,
                     scale=scene.scale, angle=scene.angle)
  out = out.reshape(resolution, supersample, resolution, supersample, 3).mean(axis=(1, 3))
  return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)


def scene_seed(seed: int, index: int) -> np.random.Generator:
  """The rng of scene `index` of stream `seed` (independent of any other index)."""
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x70E, int(index)])


def make_dataset(seed: int, num: int, resolution: int = 64, *, start: int = 0,
                 allow_held_out: bool = False):
  """(uint8 images [num, R, R, 3], scenes, captions) of scenes start..start+num-1.

  Captions name a random subset of the attributes (`caption(keep=0.8)`).
  """
  images, scenes, caps = [], [], []
  for i in range(start, start + num):
    rng = scene_seed(seed, i)
    s = sample_scene(rng, allow_held_out=allow_held_out)
    scenes.append(s)
    caps.append(caption(s, rng))
    images.append(render(s, resolution))
  return np.stack(images), scenes, caps


def label_arrays(scenes) -> dict:
  """{head: int32 [N]} of `labels` over scenes."""
  rows = [labels(s) for s in scenes]
  return {k: np.asarray([r[k] for r in rows], np.int32) for k in LABELS}


def vocabulary() -> tuple:
  """Every word a toy-world caption or subject prompt uses (for the tokenizer)."""
  words = set(CLASSES) | set(COLOURS) | set(PATTERN_NOUNS.values())
  for phrase in (*MARK_PHRASES.values(), *CONTEXT_PHRASES.values(), 'next to an', 'a photo of'):
    words.update(phrase.split())
  return tuple(sorted(words))

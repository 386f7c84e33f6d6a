r"""What the shipped toy models can do, measured with the judge.

  python -m dpg_jax.toyworld.checks --out=/tmp/toy_checks [--finetuned=<run>/export]

* `heldout_sweep`: the base model prompted with captions of the HELD_OUT
  (class, colour, pattern) triples, never seen together in pretraining; the
  judge's accuracy on class, colour, pattern and context, per guidance scale,
  against chance.
* `subject_scores`: a subject's prompts through a model; the judge's mean
  probability of the subject's attributes (`judge.attribute_score`), the
  fidelity figure a DreamBooth run should raise, and how often the judge sees
  the context a prompt names (what it should keep).
Writes checks.json and preview grids (PNG) into --out.
"""
import json
import os

import numpy as np

from dpg_jax import models
from dpg_jax import sampling
from dpg_jax.toyworld import judge as judge_lib
from dpg_jax.toyworld import model as model_lib
from dpg_jax.toyworld import subjects as subjects_lib
from dpg_jax.toyworld import weights
from dpg_jax.toyworld import world

GUIDANCE_SCALES = (1.0, 2.0, 4.0)


def heldout_prompts():
  """(prompts, targets {head: [N]}): every HELD_OUT triple in every context."""
  prompts, rows = [], []
  for i, (cls, colour, pattern) in enumerate(world.HELD_OUT):
    for j, context in enumerate(world.CONTEXTS):
      secondary = world.COLOURS[(world.COLOURS.index(colour) + 1 + (i + j) % 6) % 7]
      s = world.Scene(cls=cls, colour=colour, secondary=secondary, pattern=pattern,
                      mark='none', context=context, x=0, y=0, scale=0.5, angle=0, bg_seed=0)
      prompts.append(world.caption(s))
      rows.append(world.labels(s))
  targets = {h: np.asarray([r[h] for r in rows]) for h in ('cls', 'colour', 'pattern', 'context')}
  return prompts, targets


def sampler(sd, guidance, steps=20, batch_size=24):
  return sampling.Sampler(sd, resolution=model_lib.RESOLUTION, scheduler='ddim',
                          num_inference_steps=steps, guidance_scale=guidance,
                          batch_size=batch_size)


def heldout_sweep(sd, params, judge_params, scales=GUIDANCE_SCALES, seeds_per_prompt=1):
  """{guidance: {head: accuracy}} plus 'chance', on the held-out captions."""
  prompts, targets = heldout_prompts()
  prompts = [p for p in prompts for _ in range(seeds_per_prompt)]
  targets = {h: np.repeat(t, seeds_per_prompt) for h, t in targets.items()}
  seeds = list(range(len(prompts)))
  out, images = {}, {}
  for g in scales:
    imgs = sampler(sd, g)(params, prompts, seeds)
    out[str(g)] = judge_lib.accuracy(judge_lib.probabilities(judge_params, imgs), targets)
    images[g] = imgs
  out['chance'] = {h: 1 / len(world.LABELS[h]) for h in targets}
  out['num_prompts'] = len(prompts)
  return out, images, prompts


def subject_prompts(name, identifier='sks'):
  s = subjects_lib.get(name)
  return [t.format(f'{identifier} {s.cls}') for t in subjects_lib.PROMPT_TEMPLATES]


def prompt_contexts(prompts):
  """[N] index into world.CONTEXTS of the context each prompt names, -1 for none."""
  def one(prompt):
    return next((i for i, c in enumerate(world.CONTEXTS)
                 if world.CONTEXT_PHRASES[c] in prompt), -1)
  return np.asarray([one(p) for p in prompts])


def subject_scores(sd, params, judge_params, name, *, guidance=4.0, seeds_per_prompt=2,
                   steps=20, identifier='sks'):
  """({'attribute_score', 'context_accuracy'}, images) on the subject's prompts.

  attribute_score: the judge's mean probability of the subject's attributes
  (fidelity); context_accuracy: how often the judge sees the context a prompt
  names (text alignment; the prompts that name one).
  """
  prompts = [p for p in subject_prompts(name, identifier) for _ in range(seeds_per_prompt)]
  imgs = sampler(sd, guidance, steps)(params, prompts, list(range(len(prompts))))
  probs = judge_lib.probabilities(judge_params, imgs)
  ctx = prompt_contexts(prompts)
  named = ctx >= 0
  return {'attribute_score': judge_lib.attribute_score(probs, subjects_lib.get(name).attributes),
          'context_accuracy': float(np.mean(np.argmax(probs['context'], -1)[named]
                                            == ctx[named]))}, imgs


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  del argv
  f = flags.FLAGS
  os.makedirs(f.out, exist_ok=True)
  sd, params = models.load_stable_diffusion(weights.BASE_DIR)
  jp = judge_lib.load()
  seeds = 3  # per caption: 216 images per scale, a standard error of ~3 points
  result, images, prompts = heldout_sweep(sd, params, jp, seeds_per_prompt=seeds)
  for g, imgs in images.items():
    # First seed of the first 6 triples: a row per triple, a column per context.
    sampling.save_grid(imgs[::seeds][:36], os.path.join(f.out, f'heldout_g{g}.png'), ncols=6)
  result = {'heldout': result, 'heldout_prompts': prompts[::seeds][:12]}
  base_score, base_imgs = subject_scores(sd, params, jp, f.subject)
  result['subject'] = {'name': f.subject, 'base': base_score}
  grid = [base_imgs]
  if f.finetuned:
    sd2, params2 = models.load_stable_diffusion(f.finetuned)
    score, imgs = subject_scores(sd2, params2, jp, f.subject)
    result['subject']['finetuned'] = score
    grid.append(imgs)
  # Row 1: the subject's photos; then one row per model (base, fine-tuned), one
  # column per prompt (its first seed): the README's before/after grid.
  prompts = subject_prompts(f.subject)
  n = len(prompts)
  photos = subjects_lib.photos(f.subject)
  blank = np.full((n - len(photos),) + photos.shape[1:], 255, np.uint8)
  rows = [photos, blank] + [g.reshape((n, -1) + g.shape[1:])[:, 0] for g in grid]
  sampling.save_grid(np.concatenate(rows), os.path.join(f.out, 'subject_before_after.png'),
                     ncols=n)
  result['subject']['prompts'] = prompts
  with open(os.path.join(f.out, 'checks.json'), 'w') as fh:
    json.dump(result, fh, indent=1)
  print(json.dumps(result, indent=1))


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top,g-multiple-import
  flags.DEFINE_string('out', None, 'Output folder (checks.json, grids).', required=True)
  flags.DEFINE_string('finetuned', '', 'An exported fine-tuned pipeline to compare.')
  flags.DEFINE_string('subject', subjects_lib.DEFAULT, 'Toy subject.')
  app.run(main)

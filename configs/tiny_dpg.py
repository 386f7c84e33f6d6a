"""The embedded default with DPG on (look-forward reward).

The argument picks the recipe:
  robust    (the default) look-forward, lambda 1, the robust critic preset (the
            authors' SGD critic diverged at large t on the tiny random SD);
  faithful  the same with the authors' critic preset (SGD lr 0.01);
  tuned     the toy DreamBench's tuned recipe: the faithful critic, DreamBooth's
            instance MSE kept (weight 1) and lambda 10. Tuned on four toy subjects
            (configs/eval_toy.py:tune) and reported on the other four
            (configs/eval_toy.py:heldout); README.md, "The toy world", has both tables.

  python -m dpg_jax.main --config=configs/tiny_dpg.py --workdir=/tmp/dpg_tiny_dpg
  python -m dpg_jax.main --config=configs/tiny_dpg.py:tuned --workdir=/tmp/dpg_tiny_tuned
"""
from configs import tiny
from dpg_jax import critic

ARGS = ('robust', 'faithful', 'tuned')
TUNED_LAMBDA = 10.0              # tuning: lambda 0.3 / 1 / 3 / 10 -> judge 0.32 / 0.36 / 0.42 / 0.45
TUNED_INSTANCE_MSE_WEIGHT = 1.0  # tuning: 0 -> 1 at lambda 1: judge 0.355 -> 0.364


def get_config(arg: str = 'robust'):
  arg = arg or 'robust'
  if arg not in ARGS:
    raise ValueError(f'configs/tiny_dpg.py:{arg}: expected one of {ARGS}.')
  c = tiny.get_config()
  c.dpg.enabled = True
  c.dpg.rewards = 'look_forward:1.0'
  c.dpg.critic = critic.critic_config('faithful' if arg == 'tuned' else arg)
  c.dpg.critic.input = 'auto'
  c.dpg.tiny_encoders = True       # only built if a reward needs DINO/CLIP
  if arg == 'tuned':
    c.dpg.rewards = f'look_forward:{TUNED_LAMBDA}'
    c.dpg.instance_mse_weight = TUNED_INSTANCE_MSE_WEIGHT
  return c

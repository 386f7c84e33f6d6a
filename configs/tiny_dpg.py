"""The embedded default with DPG on (look-forward reward, robust critic).

On the toy-world base as on random-init models, the robust critic preset
(the authors' SGD critic diverged at large t on the tiny random SD):

  python -m dpg_jax.main --config=configs/tiny_dpg.py --workdir=/tmp/dpg_tiny_dpg
"""
from configs import tiny
from dpg_jax import critic


def get_config(arg: str = 'robust'):
  c = tiny.get_config()
  c.dpg.enabled = True
  c.dpg.rewards = 'look_forward:1.0'
  c.dpg.critic = critic.critic_config(arg or 'robust')
  c.dpg.critic.input = 'auto'
  c.dpg.tiny_encoders = True       # only built if a reward needs DINO/CLIP
  return c

"""The embedded default with a DPG CLIP-T reward, on the toy world.

The critic (input: x0_hat) learns the CLIP-T cost 1 - cos(CLIP(D(x0_hat)),
CLIP_text(prompt without the identifier)); the policy minimises prior MSE +
instance MSE + lambda * Q: configs/dreambooth_dpg_dino.py's recipe with the
text reward in place of DINO, scored by the toy CLIP shipped in
dpg_jax/toyworld/shipped/clip. The argument sets lambda:

  python -m dpg_jax.main --config=configs/tiny_dpg_clip_t.py:1.0 --workdir=/tmp/dpg_tiny_clip_t
"""
from configs import tiny
from dpg_jax import critic


def clip_t(c, weight: float):
  """The CLIP-T-reward DPG terms on any method's config (as `dino` of
  configs/dreambooth_dpg_dino.py)."""
  c.dpg.enabled = True
  c.dpg.rewards = f'clip_text:{weight}'
  c.dpg.instance_mse_weight = 1.0
  c.dpg.critic = critic.critic_config('robust')
  c.dpg.critic.input = 'auto'
  return c


def get_config(arg: str = '1.0'):
  c = clip_t(tiny.get_config(), float(arg or 1.0))
  c.dpg.dino_model = 'toyworld'
  c.dpg.clip_model = 'toyworld'   # the toy CLIP (dpg_jax.encoders.load_clip('toyworld'))
  return c

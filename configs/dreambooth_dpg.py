"""DPG with the look-forward reward on SD1.4: the authors' released recipe.

DreamBooth settings (configs/dreambooth.py) plus: critic on (x_0 - x0_hat)^2,
policy loss = prior MSE + gamma**t * Q (no instance MSE), gamma = 0.9986,
critic SGD lr 0.01 on raw targets. `:robust` swaps in the robust critic
(Adam, normalised targets, non-finite updates skipped):

  python -m dpg_jax.main --config=configs/dreambooth_dpg.py --workdir=runs/backpack \
    --config.data.instance_dir=photos/backpack --config.data.class_noun=backpack
  python -m dpg_jax.main --config=configs/dreambooth_dpg.py:robust ...
"""
from configs import dreambooth
from dpg_jax import critic


def look_forward(c, preset: str = 'faithful'):
  """The authors' look-forward DPG terms on any method's config (shared by the
  Custom Diffusion and LoRA variants)."""
  c.dpg.enabled = True
  c.dpg.rewards = 'look_forward:1.0'
  c.dpg.gamma = 0.9986
  c.dpg.instance_mse_weight = 0.0
  c.dpg.critic = critic.critic_config(preset or 'faithful')
  c.dpg.critic.input = 'auto'
  return c


def get_config(arg: str = 'faithful'):
  return look_forward(dreambooth.get_config(), arg)

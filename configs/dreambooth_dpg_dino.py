"""DPG with the DINO reward on SD1.4 (Sec. 3.4, Eq. 10-11).

The critic (input: x0_hat) learns the DINO cost 1 - cos(DINO(D(x0_hat)), k) of
the mean reference embedding; the policy minimises prior MSE + instance MSE +
lambda * Q. The argument sets lambda (paper ablation on robot_toy: 0.1 and 1):

  python -m dpg_jax.main --config=configs/dreambooth_dpg_dino.py:0.1 --workdir=runs/robot \
    --config.data.instance_dir=photos/robot_toy --config.data.class_noun=toy
"""
from configs import dreambooth
from dpg_jax import critic


def dino(c, weight: float):
  """The DINO-reward DPG terms on any method's config (shared by the Custom
  Diffusion variant)."""
  c.dpg.enabled = True
  c.dpg.rewards = f'dino:{weight}'
  c.dpg.instance_mse_weight = 1.0
  # The authors never released this variant; the robust critic keeps it stable.
  c.dpg.critic = critic.critic_config('robust')
  c.dpg.critic.input = 'auto'
  c.dpg.dino_model = 'facebook/dino-vits16'
  return c


def get_config(arg: str = '1.0'):
  return dino(dreambooth.get_config(), float(arg or 1.0))

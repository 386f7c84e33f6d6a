"""Custom Diffusion with the DPG look-forward reward (the paper's Table 1 row).

configs/custom_diffusion.py plus the DPG terms of configs/dreambooth_dpg.py:
critic on (x_0 - x0_hat)^2, policy loss = prior MSE + gamma**t * Q. The policy
gradient reaches only Custom Diffusion's parameters (cross-attention k/v and
the <new1> row). The argument picks the critic preset ('faithful', the
authors', by default, or 'robust'); 'tiny' runs the tiny random SD offline
with the robust critic.

  python -m dpg_jax.main --config=configs/custom_diffusion_dpg.py --workdir=runs/cat \
    --config.data.instance_dir=photos/cat --config.data.class_noun=cat
  python -m dpg_jax.main --config=configs/custom_diffusion_dpg.py:tiny --workdir=/tmp/cd_dpg
"""
from configs import custom_diffusion
from dpg_jax import critic


def get_config(arg: str = 'faithful'):
  tiny = arg == 'tiny'
  c = custom_diffusion.get_config('tiny' if tiny else '')
  c.dpg.enabled = True
  c.dpg.rewards = 'look_forward:1.0'
  c.dpg.gamma = 0.9986
  c.dpg.instance_mse_weight = 0.0
  c.dpg.critic = critic.critic_config('robust' if tiny else (arg or 'faithful'))
  c.dpg.critic.input = 'auto'
  c.dpg.tiny_encoders = tiny
  return c

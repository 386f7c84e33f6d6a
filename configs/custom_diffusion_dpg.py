"""Custom Diffusion with the DPG look-forward reward (the paper's Table 1 row).

configs/custom_diffusion.py plus the DPG terms of configs/dreambooth_dpg.py:
critic on (x_0 - x0_hat)^2, policy loss = prior MSE + gamma**t * Q. The policy
gradient reaches only Custom Diffusion's parameters (cross-attention k/v and
the <new1> row). The argument picks the critic preset ('faithful', the
authors', by default, or 'robust'); 'tiny' runs the shipped toy-world SD
(configs/tiny.py) offline with the robust critic.

  python -m dpg_jax.main --config=configs/custom_diffusion_dpg.py --workdir=runs/cat \
    --config.data.instance_dir=photos/cat --config.data.class_noun=cat
  python -m dpg_jax.main --config=configs/custom_diffusion_dpg.py:tiny --workdir=/tmp/cd_dpg
"""
from configs import custom_diffusion
from configs import dreambooth_dpg


def get_config(arg: str = 'faithful'):
  tiny = arg == 'tiny'
  c = dreambooth_dpg.look_forward(custom_diffusion.get_config('tiny' if tiny else ''),
                                  'robust' if tiny else arg)
  c.dpg.tiny_encoders = tiny
  return c

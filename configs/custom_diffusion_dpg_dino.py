"""Custom Diffusion with the DPG DINO reward (the paper's Table 1 row).

configs/custom_diffusion.py plus the terms of configs/dreambooth_dpg_dino.py:
the critic (input x0_hat) learns 1 - cos(DINO(D(x0_hat)), k); the policy
minimises prior MSE + instance MSE + lambda * Q, its gradient reaching only
Custom Diffusion's parameters. The argument sets lambda (default 1.0);
'tiny' runs the shipped toy-world SD (configs/tiny.py) with a tiny random DINO
(a plumbing check), offline.

  python -m dpg_jax.main --config=configs/custom_diffusion_dpg_dino.py:0.1 --workdir=runs/robot \
    --config.data.instance_dir=photos/robot_toy --config.data.class_noun=toy
  python -m dpg_jax.main --config=configs/custom_diffusion_dpg_dino.py:tiny --workdir=/tmp/cd_dino
"""
from configs import custom_diffusion
from configs import dreambooth_dpg_dino


def get_config(arg: str = '1.0'):
  tiny = arg == 'tiny'
  c = dreambooth_dpg_dino.dino(custom_diffusion.get_config('tiny' if tiny else ''),
                               1.0 if tiny else float(arg or 1.0))
  c.dpg.tiny_encoders = tiny
  return c

"""The embedded default with DPG's DINO reward (Sec. 3.4, Eq. 10-11), on the toy world.

configs/dreambooth_dpg_dino.py's terms (`dino(c, weight)`: reward 'dino:lambda',
instance MSE 1, robust critic on x0_hat) on configs/tiny.py, with the toy DINO
shipped in dpg_jax/toyworld/shipped/dino as the reward encoder. The argument
sets lambda:

  python -m dpg_jax.main --config=configs/tiny_dpg_dino.py:1.0 --workdir=/tmp/dpg_tiny_dino
"""
from configs import dreambooth_dpg_dino
from configs import tiny


def get_config(arg: str = '1.0'):
  c = dreambooth_dpg_dino.dino(tiny.get_config(), float(arg or 1.0))
  c.dpg.dino_model = 'toyworld'   # the toy DINO (dpg_jax.encoders.load_dino('toyworld'))
  c.dpg.clip_model = 'toyworld'
  return c

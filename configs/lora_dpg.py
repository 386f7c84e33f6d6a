"""LoRA with the DPG look-forward reward: DPG's policy gradient on rank-r adapters only.

configs/lora.py plus the DPG terms of configs/dreambooth_dpg.py. The argument
picks the critic preset ('faithful' by default, or 'robust'); 'tiny' runs the
shipped toy-world SD (configs/tiny.py) offline with the robust critic.

  python -m dpg_jax.main --config=configs/lora_dpg.py --workdir=runs/dog \
    --config.data.instance_dir=photos/dog --config.data.class_noun=dog
  python -m dpg_jax.main --config=configs/lora_dpg.py:tiny --workdir=/tmp/lora_dpg
"""
from configs import lora
from configs import dreambooth_dpg


def get_config(arg: str = 'faithful'):
  tiny = arg == 'tiny'
  c = dreambooth_dpg.look_forward(lora.get_config('tiny' if tiny else ''),
                                  'robust' if tiny else arg)
  c.dpg.tiny_encoders = tiny
  return c

"""LoRA DreamBooth on SD1.4: diffusers' train_dreambooth_lora.py recipe.

Rank-4 adapters (alpha 4, no dropout) on every UNet attention projection
(to_q, to_k, to_v, to_out.0); the base weights are frozen and out of the
optimiser state (dpg_jax/lora.py). AdamW lr 1e-4, 500 steps, batch 1, prior
preservation on. Export: <workdir>/export/pytorch_lora_weights.safetensors
(`pipe.load_lora_weights(dir)` in PyTorch diffusers).

  python -m dpg_jax.main --config=configs/lora.py --workdir=runs/dog \
    --config.data.instance_dir=photos/dog --config.data.class_noun=dog
  python -m dpg_jax.main --config=configs/lora.py:tiny --workdir=/tmp/lora_tiny

`--config.finetune.lora_text_encoder=True` adds adapters to the text encoder's
q/k/v/out_proj; `--config.finetune.lora_rank=8` etc. `:tiny` is the embedded
default's set-up (configs/tiny.py: the shipped toy-world SD, orange_star), offline.
"""
from configs import dreambooth
from configs import tiny as tiny_config

ARGS = ('', 'tiny')


def apply(c, tiny: bool = False):
  """Makes config `c` a LoRA run (shared by the DPG variant)."""
  c.finetune.method = 'lora'
  c.finetune.lora_rank = 4
  c.finetune.lora_alpha = 4.0
  c.finetune.lora_dropout = 0.0
  c.finetune.lora_text_encoder = False
  c.train_text_encoder = False
  c.prior_preservation = True
  if tiny:
    c.learning_rate = 1e-3
  else:
    c.learning_rate = 1e-4
    c.num_steps = 500
  return c


def get_config(arg: str = ''):
  if arg not in ARGS:
    raise ValueError(f'configs/lora.py:{arg}: expected one of {ARGS[1:]} or none.')
  c = tiny_config.get_config() if arg == 'tiny' else dreambooth.get_config()
  return apply(c, tiny=arg == 'tiny')

"""Custom Diffusion on SD1.4 (Kumari et al., CVPR 2023): diffusers' train_custom_diffusion.py recipe.

Trains the cross-attention k/v of every transformer block and the embedding of
the new token <new1> (initialised from 'ktn'); the rest of the model is frozen
and out of the optimiser state (dpg_jax/custom_diffusion.py). AdamW, lr 1e-5
scaled by the batch (diffusers' --scale_lr: 2e-5 at batch 2), 250 steps, prior
preservation with 200 generated class images (`--config.data.real_prior=True` with a
captioned data.class_dir for real ones), random-scale augmentation with the
matching prompt words and the masked loss (dpg_jax/scale_augment.py). Export: the delta only,
<workdir>/export/pytorch_custom_diffusion_weights.safetensors + <new1>.safetensors.

  python -m dpg_jax.main --config=configs/custom_diffusion.py --workdir=runs/cat \
    --config.data.instance_dir=photos/cat --config.data.class_noun=cat
  python -m dpg_jax.main --config=configs/custom_diffusion.py:tiny --workdir=/tmp/cd_tiny

`:crossattn` also trains to_q and to_out (their recipe for faces); `:tiny` is
the embedded default's set-up (configs/tiny.py: the shipped toy-world SD, the toy
subject orange_star; offline, a few minutes on a CPU).
"""
from configs import dreambooth
from configs import tiny as tiny_config

ARGS = ('', 'crossattn', 'tiny')


def apply(c, tiny: bool = False):
  """Makes config `c` a Custom Diffusion run (shared by the DPG variants)."""
  c.finetune.method = 'custom_diffusion'
  c.finetune.modifier_token = '<new1>'
  c.finetune.freeze_model = 'crossattn_kv'
  c.data.identifier = '<new1>'
  c.train_text_encoder = False       # only the new token's row of the text encoder trains
  c.prior_preservation = True
  c.prior_loss_weight = 1.0
  c.data.scale_augment = True        # their random-scale crops, prompt words and masked loss
  c.data.augment_bank = 8
  c.weight_decay = 1e-2
  c.max_grad_norm = 1.0
  if tiny:
    # The toy tokenizer has no 'ktn': start from a word it has.
    c.finetune.initializer_token = 'toy'
    c.learning_rate = 1e-3 * c.batch_size / 2   # only k/v and one token row train: a big step
  else:
    c.finetune.initializer_token = 'ktn+pll+ucd'
    c.batch_size = 2
    c.learning_rate = 1e-5 * c.batch_size       # --scale_lr (one device, no accumulation)
    c.num_steps = 250
    c.data.num_class_images = 200
  return c


def get_config(arg: str = ''):
  if arg not in ARGS:
    raise ValueError(f'configs/custom_diffusion.py:{arg}: expected one of {ARGS[1:]} or none.')
  c = tiny_config.get_config() if arg == 'tiny' else dreambooth.get_config()
  apply(c, tiny=arg == 'tiny')
  if arg == 'crossattn':
    c.finetune.freeze_model = 'crossattn'
  return c

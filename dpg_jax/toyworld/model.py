"""The toy Stable Diffusion: SD1.x classes at a size a 2-core CPU can pretrain.

64 px images, a x4 VAE with 4 latent channels (16x16x4 latents, 12x
compression), a three-level UNet, a two-layer CLIP text encoder and a CLIP BPE
tokenizer whose merges make every toy-world word one token. A x8 VAE with 16
channels (8x8x16 latents, the same compression) trained as well, but its UNet
never learned the object classes (judge class accuracy 28% at guidance 4,
chance 17%): an object 5 latents wide keeps its outline inside each latent's
16 channels, where a 3x3-convolution UNet must model it per position; at
16x16 the outline is a spatial pattern across ~10 latents. `write_random(path,
seed)` writes the untrained pipeline in diffusers layout (what pretraining
starts from); the shipped, pretrained one lives in `weights.BASE_DIR`. Channel
counts are multiples of 32 in the UNet: diffusers' Flax UNet hard-codes
GroupNorm(32).
"""
import os

from dpg_jax import models
from dpg_jax import tiny
from dpg_jax.toyworld import world

RESOLUTION = 64
LATENT_CHANNELS = 4
VAE_SCALE = 4       # image pixels per latent, each way
TEXT_HIDDEN = 64

UNET = {
    'sample_size': RESOLUTION // VAE_SCALE,
    'in_channels': LATENT_CHANNELS,
    'out_channels': LATENT_CHANNELS,
    # 16x16 -> 8x8 -> 4x4; cross-attention at 8x8 and in the 4x4 mid block
    # (at 16x16 it would double the step; cross-attention at 4x4 as well: +11%).
    'down_block_types': ['DownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
    'up_block_types': ['UpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'],
    'mid_block_type': 'UNetMidBlock2DCrossAttn',
    # 64 channels at 8x8 would cost 1.6x the step (XLA:CPU's backward
    # convolutions are slowest there).
    'block_out_channels': [32, 32, 64],
    'layers_per_block': 1,
    'attention_head_dim': 4,  # diffusers' (mis)name for the number of heads
    'cross_attention_dim': TEXT_HIDDEN,
    'flip_sin_to_cos': True,
    'freq_shift': 0,
}
VAE = {
    'in_channels': 3,
    'out_channels': 3,
    'down_block_types': ['DownEncoderBlock2D'] * 3,
    'up_block_types': ['UpDecoderBlock2D'] * 3,
    # 16 channels at full resolution: 1.8x faster than 32 for flat-coloured
    # scenes, and as good after 400 steps. GroupNorm(4) (the VAE reads its
    # groups from the config): with 16 groups of one channel each, every
    # channel lost its mean colour and the PSNR after 400 steps was 2.2 dB lower.
    'block_out_channels': [16, 16, 32],
    'layers_per_block': 1,
    'act_fn': 'silu',
    'latent_channels': LATENT_CHANNELS,
    'norm_num_groups': 4,
    'sample_size': RESOLUTION,
    'scaling_factor': 0.18215,  # re-measured after VAE training (pretrain.py)
}
TEXT_ENCODER = {
    'hidden_size': TEXT_HIDDEN,
    'intermediate_size': 2 * TEXT_HIDDEN,
    'num_hidden_layers': 2,
    'num_attention_heads': 2,
    'max_position_embeddings': 77,
    'hidden_act': 'quick_gelu',
    'projection_dim': TEXT_HIDDEN,
    'layer_norm_eps': 1e-5,
    'initializer_range': 0.02,
}
# SD1.4's training schedule with SD2's v-prediction: an epsilon-predicting
# toy UNet (2,000 steps) sampled noise, because at high t a small error in
# epsilon is amplified 7x into x0 (its one-step x0 at t=800 was noise); a
# v-predicting one bounds that error (x0 = sqrt(abar) x_t - sqrt(1-abar) v).
SCHEDULER = dict(tiny._SCHEDULER, prediction_type='v_prediction')  # pylint: disable=protected-access

# The identifier of the toy subjects ('sks', never in a caption) and the
# words of the embedded default are single tokens too.
EXTRA_WORDS = ('sks', 'toy', 'photo', 'of', 'the', 'in', 'on', 'at', 'by', 'with')


def tokenizer_vocab():
  """(vocab, merges) of the toy CLIP BPE tokenizer: bytes + one token per word."""
  return tiny.word_vocab(sorted(set(world.vocabulary()) | set(EXTRA_WORDS)))


def write_tokenizer(path):
  tiny.write_bpe_tokenizer(path, *tokenizer_vocab())


def text_encoder_config():
  vocab, _ = tokenizer_vocab()
  eos = vocab['<|endoftext|>']
  return dict(TEXT_ENCODER, vocab_size=len(vocab), bos_token_id=vocab['<|startoftext|>'],
              eos_token_id=eos, pad_token_id=eos)


def write_random(path, seed: int = 0, *, scaling_factor: float | None = None) -> str:
  """The untrained toy pipeline in diffusers layout (Flax msgpack) at `path`."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, FlaxCLIPTextModel  # pylint: disable=g-import-not-at-top

  models.quiet_diffusers()
  rng = np.random.default_rng(seed)

  def write(tmp):
    write_tokenizer(os.path.join(tmp, 'tokenizer'))
    vae_cfg = dict(VAE) if scaling_factor is None else dict(VAE, scaling_factor=scaling_factor)
    for name, cls, cfg in (('unet', FlaxUNet2DConditionModel, UNET),
                           ('vae', FlaxAutoencoderKL, vae_cfg)):
      m = cls.from_config(cfg)
      shapes = jax.eval_shape(m.init_weights, jax.random.PRNGKey(0))
      m.save_pretrained(os.path.join(tmp, name), params=tiny.random_params(shapes, rng))
    te = FlaxCLIPTextModel(CLIPTextConfig(**text_encoder_config()), _do_init=False)
    te.save_pretrained(os.path.join(tmp, 'text_encoder'),
                       params=tiny.random_params(te.params_shape_tree, rng))
    os.makedirs(os.path.join(tmp, 'scheduler'))
    models.write_json(os.path.join(tmp, 'scheduler', 'scheduler_config.json'),
                      models.export_scheduler_config(SCHEDULER))
    models.write_json(os.path.join(tmp, 'model_index.json'), models.FLAX_MODEL_INDEX)

  return models.replace_dir(path, write)

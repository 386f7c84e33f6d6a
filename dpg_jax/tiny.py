"""A tiny random-init Stable Diffusion in diffusers layout, for tests and demos.

`build_tiny_sd(out_dir)` writes a complete pipeline (UNet, VAE, CLIP text
encoder, CLIP BPE tokenizer, DDPM scheduler config, model_index.json) as Flax
msgpack weights, loadable by `models.load_stable_diffusion` and by
`diffusers.FlaxStableDiffusionPipeline.from_pretrained`. Needs no network.
"""
import json
import os
import shutil
import tempfile

import flax
from flax import traverse_util
import numpy as np

from dpg_jax import models

# Words the toy BPE merges into single tokens, so typical prompts stay short.
_WORDS = (
    'a', 'an', 'the', 'photo', 'picture', 'of', 'sks', 'dog', 'cat', 'in', 'on',
    'with', 'and', 'at', 'beach', 'snow', 'grass', 'red', 'blue', 'green',
    'wearing', 'hat', 'toy', 'backpack', 'sitting', 'style', 'painting', 'cube',
    'sphere', 'synthetic', 'subject', 'object', 'my', 'is')

_SCHEDULER = {
    # Same training schedule as SD1.4's scheduler/scheduler_config.json.
    '_class_name': 'DDPMScheduler',
    'beta_start': 0.00085,
    'beta_end': 0.012,
    'beta_schedule': 'scaled_linear',
    'num_train_timesteps': 1000,
    'prediction_type': 'epsilon',
    'clip_sample': False,
    'set_alpha_to_one': False,
    'steps_offset': 1,
    'trained_betas': None,
    'variance_type': 'fixed_small',
}

def _spec(unet_ch, unet_layers, heads, te_hidden, te_layers, vae_ch):
  """Configs shared by the Flax builder and the PyTorch fixture recorder."""
  n = len(unet_ch)
  return {
      'unet': {
          'sample_size': 8,
          'in_channels': 4,
          'out_channels': 4,
          'down_block_types': ['CrossAttnDownBlock2D'] * (n - 1) + ['DownBlock2D'],
          'up_block_types': ['UpBlock2D'] + ['CrossAttnUpBlock2D'] * (n - 1),
          'mid_block_type': 'UNetMidBlock2DCrossAttn',
          'block_out_channels': list(unet_ch),
          'layers_per_block': unet_layers,
          'attention_head_dim': heads,  # diffusers' (mis)name for #heads.
          'cross_attention_dim': te_hidden,  # (GroupNorm groups: fixed 32 in Flax.)
          'flip_sin_to_cos': True,
          'freq_shift': 0,
      },
      'vae': {
          'in_channels': 3,
          'out_channels': 3,
          'down_block_types': ['DownEncoderBlock2D'] * len(vae_ch),
          'up_block_types': ['UpDecoderBlock2D'] * len(vae_ch),
          'block_out_channels': list(vae_ch),
          'layers_per_block': 1,
          'act_fn': 'silu',
          'latent_channels': 4,
          'norm_num_groups': 32,
          'sample_size': 64,
          'scaling_factor': 0.18215,
      },
      'text_encoder': {
          'hidden_size': te_hidden,
          'intermediate_size': 2 * te_hidden,
          'num_hidden_layers': te_layers,
          'num_attention_heads': 2,
          'max_position_embeddings': 77,
          'hidden_act': 'quick_gelu',
          'projection_dim': te_hidden,
          'layer_norm_eps': 1e-5,
          'initializer_range': 0.02,
          # vocab_size, bos/eos/pad ids are filled in from the tokenizer.
      },
  }


# {spec: {'unet'|'vae': diffusers config, 'text_encoder': CLIPTextConfig
# kwargs without the tokenizer's ids (see text_encoder_config)}}.
# 64 px images, VAE x8 (4 blocks) -> 8x8 latents. All channels multiples of 32.
TINY_SPECS = {
    'tiny': _spec(unet_ch=(32, 64), unet_layers=1, heads=2, te_hidden=32,
                  te_layers=2, vae_ch=(32, 32, 32, 32)),
    'small': _spec(unet_ch=(32, 64, 64), unet_layers=2, heads=4, te_hidden=64,
                   te_layers=4, vae_ch=(32, 64, 64, 64)),
}

_MARKER = 'tiny_spec.json'


def bytes_to_unicode() -> dict:
  """CLIP/GPT-2's reversible byte -> printable unicode char table."""
  bs = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
        + list(range(ord('®'), ord('ÿ') + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, [chr(c) for c in cs]))


def tokenizer_vocab():
  """(vocab: dict[str, int], merges: list[str]) of the toy CLIP BPE tokenizer."""
  return word_vocab(_WORDS)


def word_vocab(words):
  """(vocab, merges) of a CLIP BPE tokenizer: the 512 byte tokens + one token per word."""
  base = list(bytes_to_unicode().values())
  vocab = base + [c + '</w>' for c in base]
  merges = []
  for word in words:
    # Merge left to right: ('p','h'), ('ph','o'), ..., ('phot','o</w>').
    parts = list(word[:-1]) + [word[-1] + '</w>']
    cur = parts[0]
    for nxt in parts[1:]:
      m = f'{cur} {nxt}'
      if m not in merges:
        merges.append(m)
        vocab.append(cur + nxt)
      cur += nxt
  vocab += ['<|startoftext|>', '<|endoftext|>']
  return {tok: i for i, tok in enumerate(vocab)}, merges


def _write_tokenizer(path):
  return write_bpe_tokenizer(path, *tokenizer_vocab())


def write_bpe_tokenizer(path, vocab, merges):
  """A CLIPTokenizer of `vocab`/`merges` (see word_vocab) saved at `path`."""
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'vocab.json'), 'w', encoding='utf-8') as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(path, 'merges.txt'), 'w', encoding='utf-8') as f:
    f.write('#version: 0.2\n' + '\n'.join(merges) + '\n')
  tok = CLIPTokenizer(os.path.join(path, 'vocab.json'), os.path.join(path, 'merges.txt'),
                      pad_token='<|endoftext|>', model_max_length=77)
  tok.save_pretrained(path)
  return tok


def text_encoder_config(spec='tiny'):
  """transformers CLIPTextConfig kwargs of `spec`, with the tokenizer's ids."""
  vocab, _ = tokenizer_vocab()
  eos = vocab['<|endoftext|>']
  return dict(TINY_SPECS[spec]['text_encoder'], vocab_size=len(vocab),
              bos_token_id=vocab['<|startoftext|>'], eos_token_id=eos, pad_token_id=eos)


def _is_complete(path):
  files = ('model_index.json', _MARKER, 'scheduler/scheduler_config.json',
           'tokenizer/vocab.json', 'tokenizer/merges.txt',
           'unet/config.json', 'unet/diffusion_flax_model.msgpack',
           'vae/config.json', 'vae/diffusion_flax_model.msgpack',
           'text_encoder/config.json', 'text_encoder/flax_model.msgpack')
  return all(os.path.isfile(os.path.join(path, f)) for f in files)


def _check_marker(out_dir, spec, seed):
  with open(os.path.join(out_dir, _MARKER)) as f:
    got = json.load(f)
  if got != {'spec': spec, 'seed': seed}:
    raise ValueError(f'{out_dir} holds tiny SD {got}, not the requested '
                     f'{{"spec": {spec!r}, "seed": {seed}}}; use another directory.')


def random_params(shapes, rng):
  """numpy params for a pytree of ShapeDtypeStructs, like Flax's default init.

  Sampled on the host from the shapes alone: running the modules' own eager
  init takes ~1 min on CPU for these models, this takes milliseconds. Biases
  get small random values (Flax uses zeros) so no branch of the toy model is
  trivially zero.
  """
  flat = traverse_util.flatten_dict(flax.core.unfreeze(shapes))
  out = {}
  for path in sorted(flat):  # Fixed order: deterministic in the rng's seed.
    shape, leaf = flat[path].shape, path[-1]
    if leaf == 'scale':
      x = 1.0 + 0.1 * rng.standard_normal(shape)
    elif leaf == 'kernel':
      x = rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
    else:  # bias, embedding
      x = 0.02 * rng.standard_normal(shape)
    out[path] = x.astype(np.float32)
  return traverse_util.unflatten_dict(out)


def _build(path, spec, seed):
  """Writes the whole pipeline into the fresh directory `path`."""
  # Imported lazily: diffusers/transformers take seconds to import.
  import jax  # pylint: disable=g-import-not-at-top
  from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, FlaxCLIPTextModel  # pylint: disable=g-import-not-at-top

  models.quiet_diffusers()
  cfg = TINY_SPECS[spec]
  rng = np.random.default_rng(seed)
  _write_tokenizer(os.path.join(path, 'tokenizer'))

  for name, cls in (('unet', FlaxUNet2DConditionModel), ('vae', FlaxAutoencoderKL)):
    model = cls.from_config(cfg[name])
    shapes = jax.eval_shape(model.init_weights, jax.random.PRNGKey(0))
    model.save_pretrained(os.path.join(path, name), params=random_params(shapes, rng))

  te = FlaxCLIPTextModel(CLIPTextConfig(**text_encoder_config(spec)), _do_init=False)
  te.save_pretrained(os.path.join(path, 'text_encoder'),
                     params=random_params(te.params_shape_tree, rng))

  os.makedirs(os.path.join(path, 'scheduler'))
  with open(os.path.join(path, 'scheduler', 'scheduler_config.json'), 'w') as f:
    json.dump(_SCHEDULER, f, indent=2)
  with open(os.path.join(path, 'model_index.json'), 'w') as f:
    json.dump(models.MODEL_INDEX, f, indent=2)
  # Written last: its presence (with the rest) marks a finished build.
  with open(os.path.join(path, _MARKER), 'w') as f:
    json.dump({'spec': spec, 'seed': seed}, f)


def build_tiny_sd(out_dir, spec='tiny', seed=0) -> str:
  """Builds tiny random SD `spec` into `out_dir` (once) and returns `out_dir`.

  Deterministic in `seed`. Idempotent: a complete `out_dir` is reused. The
  model is written to a temporary sibling and renamed into place, so a killed
  build never leaves a half-written model behind.
  """
  if spec not in TINY_SPECS:
    raise ValueError(f'Unknown tiny SD spec {spec!r}; expected one of {sorted(TINY_SPECS)}.')
  out_dir = os.path.abspath(os.fspath(out_dir))
  if _is_complete(out_dir):
    _check_marker(out_dir, spec, seed)
    return out_dir
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f'{out_dir} exists, is not empty and is not a complete tiny SD; '
                          'remove it or pick another directory.')
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.' + os.path.basename(out_dir) + '.tmp-', dir=parent)
  try:
    _build(tmp, spec, seed)
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700.
    if os.path.isdir(out_dir):
      os.rmdir(out_dir)  # Empty (checked above); rename() needs it gone or empty.
    os.rename(tmp, out_dir)
  except OSError:
    # Lost a race with a concurrent build of the same model: theirs is as good.
    if not _is_complete(out_dir):
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  _check_marker(out_dir, spec, seed)
  return out_dir

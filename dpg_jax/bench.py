"""Train-step benchmark: compile time, s/step, images/s, peak memory, TFLOP/s.

  python -m dpg_jax.bench --config=configs/tiny.py
  python -m dpg_jax.bench --config=configs/dreambooth.py --shapes=sd14 --steps=3 \\
      --variants=dreambooth,dpg --config.model.dtype=bfloat16

`--shapes=sd14` builds the UNet, text encoder and VAE at true SD1.4 shapes with
random weights (no download: speed does not depend on the weights). Variants
are measured in one process, in interleaved rounds (one step of each in turn),
so machine-load drift hits all alike and their ratio is a fair comparison. FLOPs are
XLA's cost analysis of the compiled step (analytic, per step, all devices).
"""
import copy
import json
import resource
import statistics
import tempfile
import time

from absl import flags
from ml_collections import config_flags

from dpg_jax import cli

cli.config_repo_on_path()

config_flags.DEFINE_config_file(
    'config', None, 'Config file (configs/*.py). Override any key with --config.KEY=VALUE; '
    'the keys: configs/default.py.', lock_config=True)
_SHAPES = flags.DEFINE_enum('shapes', 'config', ['config', 'sd14'],
                            "'config': the config's model; 'sd14': SD1.4 shapes, random weights.")
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (after one warm-up).')
_VARIANTS = flags.DEFINE_list('variants', ['dreambooth'],
                              'Any of: dreambooth, dpg (look-forward), dpg_dino.')
_JSON = flags.DEFINE_string('json_out', '', 'Also write the rows here as JSON.')

SD14_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
                 cross_attention_dim=768,
                 down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
                 up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3)
SD14_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), sample_size=512,
                down_block_types=('DownEncoderBlock2D',) * 4,
                up_block_types=('UpDecoderBlock2D',) * 4)
SD14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                 num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                 hidden_act='quick_gelu')
SD14_SCHEDULER = dict(_class_name='PNDMScheduler', beta_start=0.00085, beta_end=0.012,
                      beta_schedule='scaled_linear', num_train_timesteps=1000,
                      prediction_type='epsilon', set_alpha_to_one=False, skip_prk_steps=True,
                      steps_offset=1, clip_sample=False)


class _Tok:
  model_max_length = 77


def sd14_random(dtype: str, remat: bool, attention: str):
  """SD1.4-shaped modules and random params, never touching the network."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from diffusers import FlaxAutoencoderKL  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, FlaxCLIPTextModel  # pylint: disable=g-import-not-at-top
  from dpg_jax import models  # pylint: disable=g-import-not-at-top
  jdt = jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32
  unet = models.make_unet(SD14_UNET, dtype=jdt, remat=remat, attention=attention)
  vae = FlaxAutoencoderKL(**SD14_VAE, dtype=jdt)
  te = FlaxCLIPTextModel(CLIPTextConfig(**SD14_TEXT), dtype=jdt, _do_init=False)
  key = jax.random.PRNGKey(0)
  params = {
      'unet': jax.jit(unet.init_weights)(key),
      'vae': jax.jit(vae.init_weights)(key),
      'text_encoder': jax.jit(lambda k: te.module.init(
          k, jnp.zeros((1, 77), jnp.int32), jnp.ones((1, 77), jnp.int32),
          jnp.arange(77)[None])['params'])(key),
  }
  sd = models.StableDiffusion(unet=unet, vae=vae, text_encoder=te, tokenizer=_Tok(),
                              scheduler_config=dict(SD14_SCHEDULER), source='sd14-random')
  return sd, params


def _peak_memory_bytes():
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device'
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'process RSS'


def apply_variant(config, variant: str):
  c = copy.deepcopy(config)
  with c.unlocked():
    if variant == 'dreambooth':
      c.dpg.enabled = False
    elif variant == 'dpg':
      c.dpg.enabled = True
      c.dpg.rewards = 'look_forward:1.0'
    elif variant == 'dpg_dino':
      c.dpg.enabled = True
      c.dpg.rewards = 'dino:1.0'
      c.dpg.tiny_encoders = c.dpg.tiny_encoders or bool(c.model.tiny)
    else:
      raise ValueError(f'--variants: unknown {variant!r}; expected dreambooth, dpg, dpg_dino.')
  return c


def bench_variant(config, sd, params, workdir, sd14: bool = False):
  """Builds and compiles one variant's step; returns (run_step, summary)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dpg_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from dpg_jax import dpg as dpg_lib  # pylint: disable=g-import-not-at-top
  from dpg_jax import sharding  # pylint: disable=g-import-not-at-top
  from dpg_jax import train  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh(config.mesh.data)
  h = config.data.resolution // sd.vae_scale
  rs = np.random.RandomState(0)
  dpg = None
  if config.dpg.enabled:
    refs = rs.randint(0, 256, (4, config.data.resolution, config.data.resolution, 3), np.uint8)
    dino = None
    if sd14 and 'dino' in config.dpg.rewards:
      # DINO ViT-S/16 at its real shapes with random weights (no download).
      from dpg_jax import encoders  # pylint: disable=g-import-not-at-top
      enc = encoders.DinoEncoder(encoders.dino_vits16_config(), dtype=config.model.dtype)
      dino = (enc, jax.tree.map(lambda s: (0.02 * rs.randn(*s.shape)).astype(np.float32),
                                enc.init_shapes()))
    dpg = dpg_lib.DPG.build(config, sd, refs, ['a photo of sks dog'], workdir, dino=dino)
  spec = train.make_step_spec(sd, config, dpg)
  lat = lambda n: rs.randn(n, sd.latent_channels, h, h).astype(np.float32)
  n_img = max(4, config.batch_size)
  latents = data_lib.SubjectLatents(lat(n_img), np.abs(lat(n_img)) * 0.1,
                                    lat(n_img), np.abs(lat(n_img)) * 0.1)
  gb = config.batch_size * config.grad_accum_steps
  ids = rs.randint(0, 1000, size=(1, sd.max_length)).astype(np.int32)
  trainable = {'unet': params['unet']}
  if config.train_text_encoder:
    trainable['text_encoder'] = params['text_encoder']
    prompts = {'instance_ids': np.repeat(ids, gb, 0), 'class_ids': np.repeat(ids, gb, 0)}
  else:
    ctx = np.asarray(jax.jit(sd.encode_text)(params['text_encoder'], ids))
    prompts = {'instance_context': np.repeat(ctx, gb, 0), 'class_context': np.repeat(ctx, gb, 0)}
  rng = jax.random.PRNGKey(0)
  state, state_sh = train.create_sharded_state(spec, trainable, rng, mesh,
                                               config.mesh.param_sharding)
  if sd14:
    # The state holds its own copy; at SD size a second one (4 GB) decides
    # whether the step fits in host memory.
    del trainable
    params.pop('unet')
    if config.train_text_encoder:
      params.pop('text_encoder')
  frozen, frozen_sh = None, None
  if dpg is not None:
    frozen = dpg.frozen_inputs(params)
    if frozen is not None:
      frozen = sharding.put_replicated(frozen, mesh)
      frozen_sh = jax.tree.map(lambda _: sharding.replicated(mesh), frozen)
  step_fn = train.compile_train_step(spec, mesh, state_sh, frozen_sh)

  def batch(i):
    b = data_lib.sample_batch(latents, step=i, seed=0, batch_size=gb)
    b.update(prompts)
    return sharding.put_batch(b, mesh)

  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch(0), rng, frozen).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get('flops', float('nan')))
  box = {'state': state, 'metrics': None}

  def run_step(i: int) -> float:
    """One timed step (the batch is built and placed outside the timing)."""
    b = batch(i)
    t = time.perf_counter()
    box['state'], box['metrics'] = compiled(box['state'], b, rng, frozen)
    jax.block_until_ready(box['metrics'])
    return time.perf_counter() - t

  run_step(0)   # warm-up
  images = gb * (2 if config.prior_preservation else 1)

  def summary(times) -> dict:
    med = statistics.median(times)
    mem, mem_kind = _peak_memory_bytes()
    return {'compile_s': compile_s, 's_per_step': med, 'images_per_s': images / med,
            'peak_mem_gib': mem / 2**30, 'mem_kind': mem_kind, 'gflop_per_step': flops / 1e9,
            'tflop_per_s': flops / med / 1e12,
            'loss_finite': bool(box['metrics']['finite'])}

  return run_step, summary


def measure(variants, make, steps: int, interleave: bool) -> list[dict]:
  """Times every variant; interleaved rounds cancel drift in machine load.

  make(variant) -> (run_step, summary). Interleaving holds all variants'
  states at once, so SD-size runs measure one variant at a time instead.
  """
  times = {v: [] for v in variants}
  if interleave:
    runners = {v: make(v) for v in variants}
    for i in range(1, steps + 1):
      for v in variants:
        times[v].append(runners[v][0](i))
    return [{'variant': v, **runners[v][1](times[v])} for v in variants]
  rows = []
  for v in variants:
    run_step, summary = make(v)
    rows.append({'variant': v, **summary([run_step(i) for i in range(1, steps + 1)])})
    print('measured', json.dumps(rows[-1]), flush=True)  # survives a later OOM kill
    del run_step, summary
  return rows


def main(argv):
  del argv
  cli.quiet_logging()
  import jax  # pylint: disable=g-import-not-at-top
  from dpg_jax import sharding  # pylint: disable=g-import-not-at-top
  from dpg_jax import train  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  sharding.setup_runtime(config)
  workdir = tempfile.mkdtemp(prefix='dpg_bench_')
  sd = params = None
  if _SHAPES.value == 'sd14':
    with config.unlocked():
      config.data.resolution = config.data.resolution or 512
  else:
    sd, params = train.load_model(config, workdir)
  sd14 = _SHAPES.value == 'sd14'

  def make(v):
    if sd14:   # fresh random weights per variant: bench_variant frees its copy
      sd_v, params_v = sd14_random(config.model.dtype, config.model.remat,
                                   config.model.attention)
    else:
      sd_v, params_v = sd, dict(params)
    return bench_variant(apply_variant(config, v), sd_v, params_v, workdir, sd14=sd14)

  rows = measure(_VARIANTS.value, make, _STEPS.value, interleave=not sd14)
  for r in rows:
    r['step_ratio_vs_first'] = r['s_per_step'] / rows[0]['s_per_step']
  dev = jax.devices()[0]
  print(f'\ndevice: {dev.platform} {getattr(dev, "device_kind", "")} x{jax.device_count()}  '
        f'shapes={_SHAPES.value} res={config.data.resolution} batch={config.batch_size}+'
        f'{config.batch_size if config.prior_preservation else 0} dtype={config.model.dtype} '
        f'text_encoder_trained={config.train_text_encoder}')
  hdr = ('variant', 'compile_s', 's_per_step', 'images_per_s', 'peak_mem_gib', 'gflop_per_step',
         'tflop_per_s', 'step_ratio_vs_first')
  print('| ' + ' | '.join(hdr) + ' |')
  print('|' + '---|' * len(hdr))
  for r in rows:
    print('| ' + ' | '.join(str(r[h]) if isinstance(r[h], str) else f'{r[h]:.4g}'
                            for h in hdr) + ' |')
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  cli.run(main)

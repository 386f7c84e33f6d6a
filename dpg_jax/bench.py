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
import os
import resource
import statistics
import subprocess
import sys
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
                              'Any of: dreambooth, dpg (look-forward), dpg_dino, '
                              'custom_diffusion, custom_diffusion_dpg(_dino), lora, lora_dpg(_dino), '
                              'lora_merge (LoRA merged into the kernels in the step).')
_JSON = flags.DEFINE_string('json_out', '', 'Also write the rows here as JSON.')
_PEER = flags.DEFINE_string(
    'peer_python', '', 'Python of a separate venv with torch, diffusers and transformers: also '
    'time an independent PyTorch step of the same shapes (dpg_jax/bench_peer_torch.py) and '
    'print the ratio. Empty: ours only.')
_PEAK_FLAG = flags.DEFINE_float(
    'peak_tflops', 0.0, 'Peak TFLOP/s of all devices together, for MFU (0: datasheet value of '
    'known GPUs/TPUs, else MFU is nan).')
_ISOLATE = flags.DEFINE_boolean(
    'isolate', None, 'Measure each variant in a fresh process (its own peak RSS); default: on '
    'for --shapes=sd14, where variants cannot share memory anyway.')

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
  """The SD1.4-shape model's stand-in tokenizer (random ids need none); new
  tokens (Custom Diffusion) get the ids after the 49408 of SD1.4's vocabulary."""
  model_max_length = 77

  def __init__(self):
    self.added = []

  def add_tokens(self, token):
    self.added.append(token)
    return 1

  def convert_tokens_to_ids(self, tokens):
    return [SD14_TEXT['vocab_size'] + self.added.index(t) for t in tokens]

  def encode(self, text, add_special_tokens=False):
    del text, add_special_tokens
    return [1000]   # any single token: the weights are random


def sd14_random(dtype: str, remat: bool, attention: str, remat_policy='nothing_saveable', *,
                abstract: bool = False):
  """SD1.4-shaped modules and random params, never touching the network.

  abstract=True: the modules only, params as shapes (nothing allocated).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from diffusers import FlaxAutoencoderKL  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, FlaxCLIPTextModel  # pylint: disable=g-import-not-at-top
  from dpg_jax import models  # pylint: disable=g-import-not-at-top
  jdt = jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32
  unet = models.make_unet(SD14_UNET, dtype=jdt, remat=remat, attention=attention,
                          remat_policy=remat_policy)
  vae = FlaxAutoencoderKL(**SD14_VAE, dtype=jdt)
  te = FlaxCLIPTextModel(CLIPTextConfig(**SD14_TEXT), dtype=jdt, _do_init=False)
  key = jax.random.PRNGKey(0)
  init = jax.eval_shape if abstract else lambda f, k: jax.jit(f)(k)
  params = {
      'unet': init(unet.init_weights, key),
      'vae': init(vae.init_weights, key),
      'text_encoder': init(lambda k: te.module.init(
          k, jnp.zeros((1, 77), jnp.int32), jnp.ones((1, 77), jnp.int32),
          jnp.arange(77)[None])['params'], key),
  }
  sd = models.StableDiffusion(unet=unet, vae=vae, text_encoder=te, tokenizer=_Tok(),
                              scheduler_config=dict(SD14_SCHEDULER), source='sd14-random',
                              dtype=dtype, remat=remat, attention=attention,
                              remat_policy=remat_policy)
  return sd, params


def peak_rss_bytes() -> int:
  """This process's peak resident memory.

  VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child
  started from a big process would report its parent's peak.
  """
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_memory_bytes():
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device'
  return peak_rss_bytes(), 'process RSS'


# Dense peak TFLOP/s by device kind (vendor datasheets, SXM parts): (bf16, fp32).
_PEAK_TFLOPS = {'H200': (989.0, 67.0), 'H100': (989.0, 67.0), 'A100': (312.0, 19.5),
                'L4': (121.0, 30.3), 'TPU v4': (275.0, 275.0), 'TPU v5': (197.0, 197.0)}


def peak_tflops(dtype: str) -> float:
  """--peak_tflops, else the datasheet peak of this device kind (nan if unknown)."""
  import jax  # pylint: disable=g-import-not-at-top
  if _PEAK_FLAG.value:
    return _PEAK_FLAG.value
  kind = getattr(jax.devices()[0], 'device_kind', '')
  for name, (bf16, fp32) in _PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return (bf16 if dtype == 'bfloat16' else fp32) * jax.device_count()
  return float('nan')


VARIANTS = ('dreambooth', 'dpg', 'dpg_dino', 'custom_diffusion', 'custom_diffusion_dpg',
            'custom_diffusion_dpg_dino', 'lora', 'lora_dpg', 'lora_dpg_dino', 'lora_merge',
            'lora_merge_dpg')


def apply_variant(config, variant: str):
  """The config of one variant; a '_scan' suffix forces the micro-batch scan.

  'dreambooth_scan' vs 'dreambooth' is the regression row of the step's loop
  construct: the same work inside vs outside a lax.scan.
  """
  c = copy.deepcopy(config)
  base = variant[:-len('_scan')] if variant.endswith('_scan') else variant
  with c.unlocked():
    if variant != base:
      c.grad_accum_unroll = 0
    if base.startswith('lora_merge'):   # LoRA with W + s A B formed before the apply
      c.finetune.lora_form = 'merge'
      base = 'lora' + base[len('lora_merge'):]
    peft, _, dpg_part = base.partition('_dpg')
    if peft in ('custom_diffusion', 'lora'):
      # The method on the config's model and data; DPG as the 'dpg' variant.
      c.finetune.method = peft
      c.train_text_encoder = False
      if peft == 'custom_diffusion':
        c.data.identifier = c.finetune.modifier_token.split('+')[0]
        if c.model.tiny:
          c.finetune.initializer_token = 'toy'   # a single token of the toy tokenizer
      base = 'dpg' + dpg_part if base.endswith(('_dpg', '_dpg_dino')) else 'dreambooth'
    if base == 'dreambooth':
      c.dpg.enabled = False
    elif base == 'dpg':
      c.dpg.enabled = True
      c.dpg.rewards = 'look_forward:1.0'
    elif base == 'dpg_dino':
      c.dpg.enabled = True
      c.dpg.rewards = 'dino:1.0'
      c.dpg.tiny_encoders = c.dpg.tiny_encoders or bool(c.model.tiny)
    else:
      raise ValueError(f'--variants: unknown {variant!r}; expected one of {VARIANTS}, '
                       "each optionally with '_scan'.")
  return c


def bench_variant(config, sd, params, workdir, sd14: bool = False):
  """Builds and compiles one variant's step; returns (run_step, summary)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dpg_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from dpg_jax import dpg as dpg_lib  # pylint: disable=g-import-not-at-top
  from dpg_jax import sharding  # pylint: disable=g-import-not-at-top
  from dpg_jax import adapters  # pylint: disable=g-import-not-at-top
  from dpg_jax import train  # pylint: disable=g-import-not-at-top

  mesh = sharding.mesh_from_config(config.mesh)
  sd, params, peft = adapters.build(config, sd, params)
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
  spec = train.make_step_spec(sd, config, dpg, peft)
  lat = lambda n: rs.randn(n, sd.latent_channels, h, h).astype(np.float32)
  n_img = max(4, config.batch_size)
  latents = data_lib.SubjectLatents(lat(n_img), np.abs(lat(n_img)) * 0.1,
                                    lat(n_img), np.abs(lat(n_img)) * 0.1)
  # Random token ids: the SD1.4-shape model has no tokenizer (and needs none).
  vocab = min(1000, sd.text_encoder.config.vocab_size)
  ids = rs.randint(0, vocab, size=(2, sd.max_length)).astype(np.int32)
  if peft is not None and peft.name == 'custom_diffusion':
    ids[0, 2] = peft.first_new_id   # the instance prompt names the new token
  conditioning = train.conditioning_rows(sd, params['text_encoder'], config, ids)
  rng = jax.random.PRNGKey(0)
  if peft is None:
    trainable = train.trainable_params(params, config)
  else:
    trainable = peft.init_trainable(params, rng)
  abstract, state_sh = train.abstract_state(spec, trainable, rng, mesh,
                                            sharding.param_rules(config.mesh))
  frozen, frozen_sh = None, None
  if dpg is not None or peft is not None:
    frozen = dict(dpg.frozen_inputs(params) if dpg is not None else {})
    if peft is not None:   # the frozen base: a step input, as in the loop
      frozen['peft'] = peft.frozen_base(params)
    frozen = sharding.put_replicated(frozen, mesh)
    frozen_sh = jax.tree.map(lambda _: sharding.replicated(mesh), frozen)

  def batch(i):
    return sharding.put_batch(train.host_batch(latents, conditioning, step=i, config=config),
                              mesh)

  # As the loop: compiled before the state exists, which then takes the
  # trainable weights without a copy; every other reference is dropped, so
  # peak memory is the run's.
  timings = {}
  compiled, compile_s = train.compile_ahead(
      train.compile_train_step(spec, mesh, state_sh, frozen_sh), abstract, batch(0), rng, frozen,
      timings)
  state, _ = train.create_sharded_state(spec, trainable, rng, mesh,
                                        sharding.param_rules(config.mesh), donate_trainable=True)
  # Hold only what the step uses, as the PyTorch peer does: the frozen VAE and
  # text encoder (0.77 GiB at SD1.4 size) have served the latents and the
  # conditioning above; DPG's frozen inputs and an adapter run's frozen base
  # keep their own references. The training loop keeps them for previews.
  params.clear()
  del trainable
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get('flops', float('nan')))
  mem = compiled.memory_analysis()   # XLA's own account of the step's buffers
  gib = lambda name: float(getattr(mem, name, float('nan'))) / 2**30 if mem else float('nan')
  xla_mem = {'xla_args_gib': gib('argument_size_in_bytes'),
             'xla_temp_gib': gib('temp_size_in_bytes'),
             'xla_alias_gib': gib('alias_size_in_bytes')}
  # Printed now: a step that then runs out of memory has still said why.
  opt_gib = adapters.tree_bytes(state.opt_state) / 2**30
  trainable_m = sum(x.size for x in jax.tree.leaves(state.params)) / 1e6
  print('compiled', json.dumps({'compile_s': compile_s, **timings, **xla_mem}), flush=True)
  box = {'state': state, 'metrics': None}

  def run_step(i: int) -> float:
    """One timed step (the batch is built and placed outside the timing)."""
    b = batch(i)
    t = time.perf_counter()
    box['state'], box['metrics'] = compiled(box['state'], b, rng, frozen)
    jax.block_until_ready(box['metrics'])
    return time.perf_counter() - t

  run_step(0)   # warm-up
  images = config.batch_size * config.grad_accum_steps * (
      2 if config.prior_preservation else 1)

  def summary(times) -> dict:
    med = statistics.median(times)
    mem, mem_kind = _peak_memory_bytes()
    peak = peak_tflops(config.model.dtype)
    return {'compile_s': compile_s, **timings, 's_per_step': med, 'images_per_s': images / med,
            'peak_mem_gib': mem / 2**30, 'mem_kind': mem_kind, 'gflop_per_step': flops / 1e9,
            'tflop_per_s': flops / med / 1e12, 'mfu': flops / med / 1e12 / peak,
            'loss_finite': bool(box['metrics']['finite']), 'trainable_m': trainable_m,
            'opt_state_gib': opt_gib, **xla_mem}

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


def peer_spec(config, sd, variant: str, steps: int) -> dict:
  """What bench_peer_torch.py needs to run the same step in PyTorch."""
  te = sd.text_encoder.config
  return {
      'unet': {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(sd.unet.config).items()
               if k in _PEER_UNET_KEYS},
      'text_encoder': {k: getattr(te, k) for k in _PEER_TEXT_KEYS},
      'latent_hw': config.data.resolution // sd.vae_scale,
      'batch_size': config.batch_size, 'grad_accum_steps': config.grad_accum_steps,
      'prior_preservation': bool(config.prior_preservation),
      'train_text_encoder': bool(config.train_text_encoder),
      'variant': 'dpg' if variant.startswith('dpg') else 'dreambooth',
      'steps': steps, 'learning_rate': config.learning_rate,
      'max_grad_norm': config.max_grad_norm, 'gamma': config.dpg.gamma,
  }


_PEER_UNET_KEYS = ('sample_size', 'in_channels', 'out_channels', 'layers_per_block',
                   'block_out_channels', 'attention_head_dim', 'cross_attention_dim',
                   'down_block_types', 'up_block_types', 'flip_sin_to_cos', 'freq_shift')
_PEER_TEXT_KEYS = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
                   'num_attention_heads', 'max_position_embeddings', 'hidden_act')


def run_peer(peer_python: str, spec: dict) -> dict:
  """Runs bench_peer_torch.py in the peer's own Python; its JSON result."""
  with tempfile.TemporaryDirectory() as tmp:
    spec_path, out_path = os.path.join(tmp, 'spec.json'), os.path.join(tmp, 'out.json')
    with open(spec_path, 'w') as f:
      json.dump(spec, f)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bench_peer_torch.py')
    proc = subprocess.run([peer_python, script, spec_path, out_path], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
      return {'error': f'peer exited {proc.returncode}: ' + ' | '.join(tail)}
    with open(out_path) as f:
      return json.load(f)


def _isolated(variant: str, steps: int) -> dict:
  """One variant measured in a fresh process: its own peak RSS and compile."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'row.json')
    argv = [a for a in sys.argv[1:] if not a.startswith(('--variants', '--json_out', '--peer',
                                                         '--isolate'))]
    cmd = [sys.executable, '-m', 'dpg_jax.bench', *argv, f'--variants={variant}',
           f'--json_out={out}', '--noisolate', f'--steps={steps}']
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
      return {'variant': variant, 'error': f'exited {proc.returncode} (killed for memory?)'}
    with open(out) as f:
      return json.load(f)['rows'][0]


def _fmt(v) -> str:
  return v if isinstance(v, str) else str(v) if isinstance(v, bool) else f'{v:.4g}'


def print_table(rows, keys) -> None:
  print('| ' + ' | '.join(keys) + ' |')
  print('|' + '---|' * len(keys))
  for r in rows:
    print('| ' + ' | '.join(_fmt(r.get(k, '-')) for k in keys) + ' |')


def main(argv):
  del argv
  cli.quiet_logging()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dpg_jax import sharding  # pylint: disable=g-import-not-at-top
  from dpg_jax import train  # pylint: disable=g-import-not-at-top
  config = flags.FLAGS.config
  sd14 = _SHAPES.value == 'sd14'
  if sd14:
    with config.unlocked():
      config.data.resolution = config.data.resolution or 512
  for v in _VARIANTS.value:
    apply_variant(config, v)   # a bad variant name fails before any build
  isolate = _ISOLATE.value if _ISOLATE.value is not None else sd14
  if isolate and len(_VARIANTS.value) > 1:
    rows = [_isolated(v, _STEPS.value) for v in _VARIANTS.value]
  else:
    sharding.setup_runtime(config)
    workdir = tempfile.mkdtemp(prefix='dpg_bench_')
    sd = params = None
    if not sd14:
      sd, params = train.load_model(config, workdir)

    def make(v):
      if sd14:   # fresh random weights per variant: bench_variant frees its copy
        sd_v, params_v = sd14_random(config.model.dtype, config.model.remat,
                                     config.model.attention, config.model.remat_policy)
      else:
        sd_v, params_v = sd, jax.tree.map(jnp.copy, params)  # each variant donates its own
      return bench_variant(apply_variant(config, v), sd_v, params_v, workdir, sd14=sd14)

    rows = measure(_VARIANTS.value, make, _STEPS.value, interleave=not sd14)
  ok = [r for r in rows if 'error' not in r]
  for r in ok:
    r['step_ratio_vs_first'] = r['s_per_step'] / ok[0]['s_per_step']
  dev = jax.devices()[0]
  header = (f'device: {dev.platform} {getattr(dev, "device_kind", "")} x{jax.device_count()}  '
            f'shapes={_SHAPES.value} res={config.data.resolution} batch={config.batch_size}+'
            f'{config.batch_size if config.prior_preservation else 0} '
            f'accum={config.grad_accum_steps} dtype={config.model.dtype} '
            f'text_encoder_trained={config.train_text_encoder} remat={config.model.remat} '
            f'attention={config.model.attention} opt_state={config.optimizer_state_dtype}')
  print('\n' + header)
  print_table(rows, ('variant', 'compile_s', 'trace_s', 'cache_hit', 's_per_step', 'images_per_s',
                     'peak_mem_gib', 'trainable_m', 'opt_state_gib',
                     'xla_args_gib', 'xla_temp_gib', 'xla_alias_gib', 'gflop_per_step',
                     'tflop_per_s', 'mfu', 'step_ratio_vs_first', 'error'))
  peers = []
  if _PEER.value:
    sd_shapes = sd14_random(config.model.dtype, False, 'standard', abstract=True)[0] if sd14 \
        else train.load_model(config, tempfile.mkdtemp(prefix='dpg_bench_'))[0]
    for r in ok:
      if r['variant'].startswith(('custom_diffusion', 'lora')):
        continue   # the peer fine-tunes the whole UNet only
      p = run_peer(_PEER.value, peer_spec(apply_variant(config, r['variant']), sd_shapes,
                                          r['variant'], _STEPS.value))
      peers.append({'variant': r['variant'], 'ours_s_per_step': r['s_per_step'],
                    'peer_s_per_step': p.get('s_per_step', float('nan')),
                    'ratio_ours_over_peer': r['s_per_step'] / p.get('s_per_step', float('nan')),
                    'ours_peak_gib': r['peak_mem_gib'],
                    'peer_peak_gib': p.get('peak_rss_gib', float('nan')),
                    'peer': f"torch {p.get('torch', '?')}" if 'error' not in p else p['error']})
    print(f'\nvs an independent PyTorch step ({_PEER.value}), same shapes and work:')
    print_table(peers, ('variant', 'ours_s_per_step', 'peer_s_per_step', 'ratio_ours_over_peer',
                        'ours_peak_gib', 'peer_peak_gib', 'peer'))
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump({'header': header, 'rows': rows, 'peer': peers}, f, indent=1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  cli.run(main)

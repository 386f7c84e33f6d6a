"""The toy DreamBench: the methods compared offline on the toy world, with error bars.

  python -m dpg_jax.evaluate --config=configs/eval_toy.py --workdir=/tmp/toy_dreambench

Toy subjects (dataset 'toyworld', rendered by dpg_jax/toyworld/subjects.py) x
METHODS x the 13 toy prompts x 3 training seeds, on the shipped toy-world SD:

  toy_dreambooth     configs/tiny.py (DreamBooth, the embedded default)
  toy_dpg_faithful   configs/tiny_dpg.py:faithful (DPG look-forward, the authors' critic)
  toy_dpg_robust     configs/tiny_dpg.py:robust   (DPG look-forward, robust critic)
  toy_dpg_dino       configs/tiny_dpg_dino.py     (DPG, toy-DINO reward, lambda 1)
  toy_dpg_clip_t     configs/tiny_dpg_clip_t.py   (DPG, toy-CLIP-T reward, lambda 1)

scored with the toy DINO / CLIP-I / CLIP-T (dpg_jax/toyworld/shipped/{dino,clip})
and the judge (Judge subject: its probability of the subject's attributes;
Judge context: images in the context the prompt names), plus the real-image
row. Cells: mean ± standard error over subjects, (seeds ± ...) over the
training seeds. Kill and rerun the same command to resume. More subjects:
--config.subjects="()" (all 8) or a tuple of names; the full method length:
--config.train.num_steps=800.

The tuning protocol (what the paper leaves open, tuned on half of the toy
subjects, reported on the other half; one training seed per run):

  python -m dpg_jax.evaluate --config=configs/eval_toy.py:tune --workdir=/tmp/toy_tune
  python -m dpg_jax.evaluate --config=configs/eval_toy.py:heldout --workdir=/tmp/toy_heldout

`:tune` trains TUNE_METHODS (the defaults and VARIANTS: the DINO-reward critic's
init and architecture, look-forward's instance MSE and lambda) on
TUNE_SUBJECTS; `:heldout` the winners, the defaults and Custom Diffusion / LoRA
(alone and with DPG) on HELDOUT_SUBJECTS. README.md has both tables.

Default size, sized for 60 minutes on the 2-core CPU. Measured, one cold
(method, subject, seed) unit of this config at the methods' 800 steps, niced:
  DreamBooth (quiet machine; scored with tiny random encoders, before the toy
      ones shipped) 190 s: train 150 s (set-up 58 s = 8 class images + 36 s
      train-step compile; 800 steps at 8.8 steps/s = 91 s), sampling 26
      images 21 s, scoring 7 s (compiles included);
  DPG CLIP-T reward, the slowest (machine shared with a pretraining job,
      load ~3.5) 371 s: train 306 s (set-up 91 s, compile 51 s; 800 steps at
      3.75 steps/s = 213 s), sampling 45 s, scoring 11 s;
  under the same load: DPG DINO reward 4.8 steps/s (tiny random DINO as the
      reward encoder, before the toy one shipped; compile 69 s), DPG
      look-forward 5.0 steps/s (compile 73 s). DreamBooth on two subjects
      at once (subjects_at_once=2, same load) ran 2.0 steps/s for the pair,
      4.0 subject-steps/s: no gain over one at a time, so 1.
A further unit, measured: DreamBooth with a second training seed in the same
workdir (its train step from <workdir>/xla_cache, new class images for the
new seed), a new process: 171 s = train 142 s (set-up 43 s: class images and
a 21 s trace + cache hit, which every run pays again; 800 steps at 8.2
steps/s = 98 s), sampling 9 s, scoring 6 s, references 5 s. So a unit costs
its steps + ~58 s (DreamBooth: that set-up with the (class, seed)'s class
images, + 15 s sampling and scoring) or, estimated, ~50 s (a DPG method:
class images shared, a longer trace than DreamBooth's). That estimate put
400 steps at ~65 min; the whole default table, run at 400 steps (2 subjects x
5 methods x 3 seeds = 30 runs, 780 images), took 50.5 min end to end on this
CPU (sampling 172 s, scoring 68 s, compiles included; the rest training),
with other test runs beside it part of the time: the default is 400.
"""
from configs import eval_dreambench

METHODS = ('toy_base', 'toy_dreambooth', 'toy_dpg_faithful', 'toy_dpg_robust', 'toy_dpg_tuned',
           'toy_dpg_dino', 'toy_dpg_clip_t', 'toy_custom_diffusion', 'toy_custom_diffusion_dpg', 'toy_lora',
           'toy_lora_dpg')

# The tuning protocol (`:tune`, `:heldout`): what the paper leaves open is tuned
# on the first half of the 8 toy subjects, one training seed each, and the
# winners are reported on the other half.
TUNE_SUBJECTS = ('orange_star', 'blue_heart', 'yellow_ring', 'red_house')
HELDOUT_SUBJECTS = ('green_robot', 'purple_mug', 'white_star', 'green_heart')
# name -> (config file it varies, overrides of its training config)
VARIANTS = {
    # The base model, untrained (0 steps: its export is the shipped toy SD).
    'toy_base': ('configs/tiny.py', {'num_steps': 0}),
    # The DINO-reward critic: zero-mean-initialised scalar, and embedding-regressing.
    'toy_dpg_dino_zero_mean': ('configs/tiny_dpg_dino.py',
                               {'dpg': {'critic': {'init': 'zero_mean'}}}),
    'toy_dpg_dino_embedding': ('configs/tiny_dpg_dino.py',
                               {'dpg': {'critic': {'arch': 'embedding'}}}),
    # Look-forward with DreamBooth's instance loss kept, and with lambda 0.3.
    'toy_dpg_faithful_mse': ('configs/tiny_dpg.py:faithful',
                             {'dpg': {'instance_mse_weight': 1.0}}),
    'toy_dpg_faithful_l03': ('configs/tiny_dpg.py:faithful',
                             {'dpg': {'rewards': 'look_forward:0.3'}}),
    # The second round, on the first round's best look-forward (instance MSE 1):
    # lambda 3, and a 10x slower critic; the DINO reward at lambda 0.3.
    'toy_dpg_faithful_mse_l3': ('configs/tiny_dpg.py:faithful',
                                {'dpg': {'instance_mse_weight': 1.0,
                                         'rewards': 'look_forward:3.0'}}),
    'toy_dpg_faithful_mse_clr': ('configs/tiny_dpg.py:faithful',
                                 {'dpg': {'instance_mse_weight': 1.0,
                                          'critic': {'learning_rate': 0.001}}}),
    'toy_dpg_dino_l03': ('configs/tiny_dpg_dino.py:0.3', {}),
    # The third round: lambda 10 (1 -> 3 raised both fidelity scores).
    'toy_dpg_faithful_mse_l10': ('configs/tiny_dpg.py:faithful',
                                 {'dpg': {'instance_mse_weight': 1.0,
                                          'rewards': 'look_forward:10.0'}}),
}
TUNE_METHODS = ('toy_dreambooth', 'toy_dpg_faithful', 'toy_dpg_dino') + tuple(
    v for v in VARIANTS if v != 'toy_base')
# The winners (toy_dpg_tuned: configs/tiny_dpg.py:tuned), the defaults, the
# DINO-reward critics and Custom Diffusion / LoRA alone and with DPG.
HELDOUT_METHODS = ('toy_base', 'toy_dreambooth', 'toy_dpg_faithful', 'toy_dpg_tuned',
                   'toy_dpg_dino', 'toy_dpg_dino_zero_mean', 'toy_dpg_dino_embedding',
                   'toy_custom_diffusion', 'toy_custom_diffusion_dpg', 'toy_lora', 'toy_lora_dpg')
ARGS = ('', 'tune', 'heldout')


def get_config(arg: str = ''):
  if arg not in ARGS:
    raise ValueError(f'configs/eval_toy.py:{arg}: expected one of {ARGS[1:]} or none.')
  c = eval_dreambench.get_config()
  c.methods = METHODS
  c.dataset = 'toyworld'
  c.dataset_dir = ''
  c.subjects = ('orange_star', 'blue_heart')   # () = all 8 toy subjects
  c.train_seeds = (0, 1, 2)
  c.train.num_steps = 400           # the methods' own: 800 (see the budget above)
  c.subjects_at_once = 1            # measured: several at once is no faster here
  c.train_workers = 2               # two training processes: ~1.2 cores each (see above)
  c.seed = 0
  c.images_per_prompt = 2           # 26 images per (method, subject, seed)
  # The toy checks' sampling (dpg_jax/toyworld/checks.py): DDIM 20 steps, guidance 4.
  c.sample.scheduler = 'ddim'
  c.sample.num_inference_steps = 20
  c.sample.guidance_scale = 4.0
  c.sample.batch_size = 26          # a unit's 13 prompts x 2 images in one call
  c.scorer.dino_model = 'toyworld'  # dpg_jax/toyworld/shipped/dino
  c.scorer.clip_model = 'toyworld'  # dpg_jax/toyworld/shipped/clip
  c.scorer.judge = 'toyworld'       # dpg_jax/toyworld/shipped/judge.msgpack
  c.scorer.batch_size = 32
  for name, (path, overrides) in VARIANTS.items():
    c.method_configs[name] = path
    c.method_overrides[name] = overrides
  if arg == 'tune':
    c.methods, c.subjects, c.train_seeds = TUNE_METHODS, TUNE_SUBJECTS, (0,)
  elif arg == 'heldout':
    c.methods, c.subjects, c.train_seeds = HELDOUT_METHODS, HELDOUT_SUBJECTS, (0,)
  return c

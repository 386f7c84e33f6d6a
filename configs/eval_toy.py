"""The toy DreamBench: the methods compared offline on the toy world, with error bars.

  python -m dpg_jax.evaluate --config=configs/eval_toy.py --workdir=/tmp/toy_dreambench

Toy subjects (dataset 'toyworld', rendered by dpg_jax/toyworld/subjects.py) x
METHODS x the 13 toy prompts x 3 training seeds, on the shipped toy-world SD:

  toy_base                  configs/tiny.py at 0 steps (the untrained base)
  toy_dreambooth            configs/tiny.py (DreamBooth, the embedded default)
  toy_dpg_faithful          configs/tiny_dpg.py:faithful (DPG look-forward, the authors' critic)
  toy_dpg_robust            configs/tiny_dpg.py:robust   (DPG look-forward, robust critic)
  toy_dpg_tuned             configs/tiny_dpg.py:tuned    (DPG look-forward, tuned: `:tune`)
  toy_dpg_dino              configs/tiny_dpg_dino.py     (DPG, toy-DINO reward, lambda 1)
  toy_dpg_clip_t            configs/tiny_dpg_clip_t.py   (DPG, toy-CLIP-T reward, lambda 1)
  toy_custom_diffusion      configs/custom_diffusion.py:tiny
  toy_custom_diffusion_dpg  configs/custom_diffusion_dpg.py:tiny (+ DPG look-forward, robust)
  toy_lora                  configs/lora.py:tiny (rank 4)
  toy_lora_dpg              configs/lora_dpg.py:tiny (+ DPG look-forward, robust)

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

Default size, sized for 60 minutes on the 2-core CPU: 2 subjects x 11 methods x
3 seeds = 66 runs of 400 steps (the methods' own: 800), 26 images each. A toy
training process keeps ~1.2 of the 2 cores busy (its steps are many small XLA
ops), so two training workers (train_workers=2) train the queued runs while
the main process samples and scores: the 5-method table of the previous
default (30 runs) took 50.5 min in one process; measured with two workers,
cold workdir, this default took 49.7 min (66 runs: the main process waited
32.5 min for training in all, sampled 1,716 images in 9.6 min and scored them in
4.0 min, compiles included), and reproduced the old rows' figures exactly.
Several subjects in one job (subjects_at_once=2, measured: 2.0 steps/s for the
pair, 4.0 subject-steps/s) is no faster than one at a time, so 1.
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

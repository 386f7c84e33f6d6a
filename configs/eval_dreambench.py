"""DreamBench evaluation of the SD1.4 methods (the protocol of the paper's Table 1).

Every (subject, method) is trained with the method's config into
<workdir>/runs/<method>/<subject>, then `images_per_prompt` images per prompt
are generated for the subject's 25 DreamBench prompts and scored with DINO
ViT-S/16, CLIP-I and CLIP-T (ViT-B/32). Kill and rerun the same command to
continue where it stopped.

Sampling protocols (`--config=configs/eval_dreambench.py:<preset>`):

  dpg (the default)  The DPG authors' `generate_images.py`, the protocol behind
                     the paper's Table 1: PNDM, 200 steps, guidance 7.5, 8
                     images per prompt (6000 per method), seeds from 23.
  dreambooth         The DreamBooth paper's protocol: 4 images per prompt (3000
                     per method). That paper names no SD sampler; we use the
                     SD1.4 pipeline defaults, PNDM, 50 steps, guidance 7.5,
                     seeds from 0.

Seeds: image i of every prompt (and every method) starts from the noise of
seed `seed + i` (dpg: 23, 24, ..., 30). The authors instead drew all images
of a run from one torch generator seeded 23, so their noise also differs
between prompts and follows torch's CUDA stream, which JAX cannot reproduce:
"seed 23" here is the same starting seed, not the same noise. They also
sampled in fp16; we sample in the method's `model.dtype`.

  python -m dpg_jax.evaluate --config=configs/eval_dreambench.py --workdir=runs/eval \
      --config.dataset_dir=/data/dreambooth/dataset
  python -m dpg_jax.evaluate --config=configs/eval_dreambench.py:dreambooth \
      --workdir=runs/eval_db --config.dataset_dir=/data/dreambooth/dataset
  python -m dpg_jax.evaluate --config=configs/eval_dreambench.py --workdir=runs/eval_dog \
      --config.subjects="('dog',)" --config.methods="('dreambooth',)" \
      --config.train.num_steps=200
"""
import ml_collections
from ml_collections import config_dict


# name -> (scheduler, steps, guidance, images per prompt, first seed); see above.
PROTOCOLS = {
    'dpg': ('pndm', 200, 7.5, 8, 23),
    'dreambooth': ('pndm', 50, 7.5, 4, 0),
}
DEFAULT_PROTOCOL = 'dpg'


def get_config(protocol: str | None = None):
  """The evaluation config under sampling `protocol` (None: DEFAULT_PROTOCOL)."""
  protocol = protocol or DEFAULT_PROTOCOL
  if protocol not in PROTOCOLS:
    raise ValueError(f'configs/eval_dreambench.py:{protocol}: unknown protocol; expected '
                     f'one of {", ".join(PROTOCOLS)}.')
  scheduler, steps, guidance, images_per_prompt, seed = PROTOCOLS[protocol]
  c = ml_collections.ConfigDict()
  c.seed = seed                     # image i of every prompt uses seed + i

  # --- Methods: name -> training config file ('path' or 'path:arg') ------------
  c.methods = ('dreambooth', 'dreambooth_dpg')
  c.method_configs = ml_collections.ConfigDict({
      'dreambooth': 'configs/dreambooth.py',
      'dreambooth_dpg': 'configs/dreambooth_dpg.py',
      'dreambooth_dpg_robust': 'configs/dreambooth_dpg.py:robust',
      'dreambooth_dpg_dino': 'configs/dreambooth_dpg_dino.py',
      'tiny': 'configs/tiny.py',
      'tiny_dpg': 'configs/tiny_dpg.py',
      # Custom Diffusion (the paper's other Table 1 rows) and LoRA, alone and with DPG.
      'custom_diffusion': 'configs/custom_diffusion.py',
      'custom_diffusion_dpg': 'configs/custom_diffusion_dpg.py',
      'custom_diffusion_dpg_dino': 'configs/custom_diffusion_dpg_dino.py',
      'lora': 'configs/lora.py',
      'lora_dpg': 'configs/lora_dpg.py',
      'tiny_custom_diffusion': 'configs/custom_diffusion.py:tiny',
      'tiny_custom_diffusion_dpg': 'configs/custom_diffusion_dpg.py:tiny',
      'tiny_custom_diffusion_dpg_dino': 'configs/custom_diffusion_dpg_dino.py:tiny',
      'tiny_lora': 'configs/lora.py:tiny',
      'tiny_lora_dpg': 'configs/lora_dpg.py:tiny',
      # The toy DreamBench (configs/eval_toy.py): the methods on the shipped toy-world SD.
      'toy_dreambooth': 'configs/tiny.py',
      'toy_dpg_faithful': 'configs/tiny_dpg.py:faithful',
      'toy_dpg_robust': 'configs/tiny_dpg.py:robust',
      'toy_dpg_tuned': 'configs/tiny_dpg.py:tuned',
      'toy_dpg_dino': 'configs/tiny_dpg_dino.py',
      'toy_dpg_clip_t': 'configs/tiny_dpg_clip_t.py',
      'toy_custom_diffusion': 'configs/custom_diffusion.py:tiny',
      'toy_custom_diffusion_dpg': 'configs/custom_diffusion_dpg.py:tiny',
      'toy_lora': 'configs/lora.py:tiny',
      'toy_lora_dpg': 'configs/lora_dpg.py:tiny',
  })
  # Per-method overrides of its training config: method -> nested fields, e.g.
  # c.method_overrides.my_variant = {'dpg': {'critic': {'init': 'zero_mean'}}}
  # (with method_configs.my_variant naming the file it varies); applied after `train`.
  c.method_overrides = ml_collections.ConfigDict()
  # Overrides of every method's training config (None = keep the method's).
  c.train = ml_collections.ConfigDict()
  c.train.num_steps = config_dict.placeholder(int)
  c.train.learning_rate = config_dict.placeholder(float)
  c.train.checkpoint_every = config_dict.placeholder(int)
  c.train.sample_every = 0          # previews are not needed: the evaluation samples
  c.train.export = True
  c.keep_checkpoints = False        # delete a run's checkpoints once export/ exists
  c.keep_exports = True             # False: delete export/ after its images are scored
  # Class images depend only on base model, class prompt and sampling: runs
  # that share those (e.g. dreambooth and dreambooth_dpg on 'dog') share them.
  c.share_class_images = True
  # Subjects trained together in one job on one mesh (dpg_jax/multisubject.py: the
  # trainable state vmapped over a 'subject' mesh axis, one subject per device group):
  # 1 = one job per subject, K > 1 = groups of K, 0 = all of a method's subjects at once.
  c.subjects_at_once = 1
  # Training processes (spawned) that train the queued runs while this one
  # samples and scores the finished ones: on a CPU whose training steps leave
  # cores idle (the toy world) 2 nearly doubles the throughput; 1 = in-process.
  c.train_workers = 1
  # Training seeds, a second error axis: each (method, subject, seed) trains with
  # `seed` overridden, into runs/<method>/<subject>/seed<k>; the report adds the
  # standard error over seeds. () = each method's own seed, runs/<method>/<subject>.
  c.train_seeds = ()

  # --- Subjects ---------------------------------------------------------------
  c.dataset = 'dreambench'
  c.dataset_dir = ''                # manual dir; '' = ../shared/data/dreambench if present
  c.subjects = ()                   # () = all 30 (the missing ones are listed, not evaluated)
  c.synthetic_subjects = 0          # > 0: that many synthetic subjects instead of a dataset
  c.synthetic_resolution = 64
  c.synthetic_class_noun = 'toy'
  c.identifier = 'sks'
  c.prompts_limit = 0               # 0 = all 25 prompts per subject
  c.images_per_prompt = images_per_prompt

  # --- Sampling ---------------------------------------------------------------
  c.sample = ml_collections.ConfigDict()
  c.sample.scheduler = scheduler    # ddim | pndm | dpm_solver
  c.sample.num_inference_steps = steps
  c.sample.guidance_scale = guidance
  c.sample.negative_prompt = ''
  c.sample.batch_size = 8           # images per compiled call (several prompts fill it)
  c.sample.resolution = 0           # 0 = the method's data.resolution

  # --- Metrics ----------------------------------------------------------------
  c.scorer = ml_collections.ConfigDict()
  c.scorer.dino_model = 'facebook/dino-vits16'          # hub id, HF dir or DINO .pth
  c.scorer.clip_model = 'openai/clip-vit-base-patch32'  # hub id or HF dir
  c.scorer.tiny = False             # tiny random encoders built in the workdir (tests)
  c.scorer.batch_size = 32
  # The toy-world judge (toy subjects only): per-prompt 'subject' (its score of the
  # subject's attributes) and 'context' accuracy. '' = off, 'toyworld' = the shipped
  # judge, or a judge .msgpack path.
  c.scorer.judge = ''

  # --- Devices ----------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.distributed = config_dict.placeholder(bool)   # None = auto (see configs/default.py)
  c.compilation_cache_dir = ''
  # '' above: cache compiled programs in <workdir>/xla_cache, so runs of one
  # method (identical train steps) and a resumed evaluation skip recompiling.
  c.workdir_compilation_cache = True
  return c

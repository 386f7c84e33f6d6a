"""Base config: every field a user may override lives here.

Variants (`dreambooth.py`, `tiny.py`, ...) import `get_config` from this file and
change a few fields. Override any field from the command line, e.g.
`--config.learning_rate=2e-6 --config.data.instance_dir=/photos/dog`.
"""
import ml_collections
from ml_collections import config_dict

from dpg_jax import critic


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0

  # --- Models -----------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  # Hub id (e.g. 'CompVis/stable-diffusion-v1-4') or a local directory in
  # diffusers layout (unet/, vae/, text_encoder/, tokenizer/, scheduler/).
  c.model.pretrained = 'CompVis/stable-diffusion-v1-4'
  c.model.revision = ''            # hub revision/branch ('' = default; 'flax' for SD1.4 msgpack)
  c.model.weights_format = 'auto'  # auto | flax | safetensors | pytorch
  # If non-empty, build this tiny random-init SD (see dpg_jax/tiny.py) into
  # <workdir>/pretrained_tiny once and load it from there (no network).
  c.model.tiny = ''
  c.model.dtype = 'float32'        # compute dtype: float32 | bfloat16 (master weights stay fp32)
  c.model.remat = False            # nn.remat around UNet blocks (activation memory for compute)
  # What each remat'd block keeps for the backward: nothing_saveable | dots_saveable |
  # dots_with_no_batch_dims_saveable | everything_saveable (jax.checkpoint_policies).
  c.model.remat_policy = 'nothing_saveable'
  # standard | memory_efficient | split_head_dim (diffusers' Flax variants) | dot_product
  # (jax.nn.dot_product_attention: cuDNN flash attention on GPU in bf16, XLA elsewhere).
  c.model.attention = 'standard'

  # --- Subject data -----------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.instance_dir = ''         # folder of the subject's photos
  c.data.subject = ''              # or a subject of a dataset, e.g. 'dog' (see dpg_jax/datasets)
  c.data.dataset = 'dreambench'    # dataset that `subject` is looked up in
  c.data.dataset_dir = ''          # manual_dir of that dataset ('' = ../shared/data/dreambench if present)
  c.data.synthetic = False         # generate a synthetic subject into <workdir>/instance_images
  c.data.identifier = 'sks'
  c.data.class_noun = 'dog'
  c.data.instance_prompt = ''      # '' = 'a photo of {identifier} {class_noun}'
  c.data.class_prompt = ''         # '' = 'a photo of {class_noun}'
  c.data.resolution = 512
  c.data.center_crop = True
  c.data.random_flip = False
  c.data.min_instance_images = 1
  # Prior preservation: class images from this folder ('' = <workdir>/class_images);
  # missing ones are generated with the frozen model and saved there.
  c.data.class_dir = ''
  c.data.num_class_images = 8
  c.data.class_sample_steps = 50
  c.data.class_guidance_scale = 7.5
  # Custom Diffusion's data recipe (dpg_jax/scale_augment.py): random-scale crops with the
  # prompt words 'very small' / 'far away' / 'zoomed in' / 'close up' and the masked loss,
  # drawn once into a pre-encoded bank of `augment_bank` crops per photo.
  c.data.scale_augment = False
  c.data.augment_bank = 8
  # Real regularisation images: class_dir holds images.txt + caption.txt (one path /
  # caption per line, as their retrieval script writes); each trains with its caption.
  c.data.real_prior = False

  # --- Optimisation (DreamBooth baseline) -------------------------------------
  c.num_steps = 1000
  c.batch_size = 1                 # instance images per step (plus as many class images)
  c.grad_accum_steps = 1
  # Accumulation counts up to this run as straight-line code; larger ones as a
  # lax.scan (smaller program, but XLA:CPU runs backward convolutions inside
  # loops ~10x slower). 0 forces the scan even for one micro-batch (benchmark).
  c.grad_accum_unroll = 8
  c.learning_rate = 1e-6           # finite, > 0
  c.lr_schedule = 'constant'       # constant | cosine | linear
  c.warmup_steps = 0
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-8
  c.weight_decay = 1e-2
  c.max_grad_norm = 1.0
  # Storage dtype of both Adam moments: float32 | bfloat16 (halves optimiser memory;
  # the update is still computed in float32). See dpg_jax/optimizer.py.
  c.optimizer_state_dtype = 'float32'
  c.train_text_encoder = True
  c.prior_preservation = True
  c.prior_loss_weight = 1.0
  c.prediction_type = ''           # '' = the scheduler's; epsilon | v_prediction

  # --- What trains (dpg_jax/adapters.py) ---------------------------------------
  c.finetune = ml_collections.ConfigDict()
  # full (DreamBooth: UNet, + text encoder with train_text_encoder) | custom_diffusion | lora.
  # custom_diffusion and lora need train_text_encoder=False; their export is the delta only.
  c.finetune.method = 'full'
  # Custom Diffusion (dpg_jax/custom_diffusion.py; diffusers' train_custom_diffusion.py flags):
  c.finetune.modifier_token = '<new1>'         # '+'-separated new tokens; data.identifier is one
  c.finetune.initializer_token = 'ktn+pll+ucd'  # each new token's row starts as this token's
  c.finetune.freeze_model = 'crossattn_kv'     # crossattn_kv (attn2 k, v) | crossattn (+ q, out)
  # LoRA (dpg_jax/lora.py): W + (alpha / rank) * dropout(x) A B on attention projections.
  c.finetune.lora_rank = 4
  c.finetune.lora_alpha = 4.0
  c.finetune.lora_dropout = 0.0
  c.finetune.lora_text_encoder = False         # also adapt the text encoder's q/k/v/out_proj
  c.finetune.lora_form = 'intercept'           # intercept (x W + s x A B) | merge (W + s A B first)

  # --- DPG (critic in latent space; see dpg_jax/dpg.py) -----------------------
  c.dpg = ml_collections.ConfigDict()
  c.dpg.enabled = False
  # Rewards and their weights lambda_i: 'name:weight,...' from the registry in
  # dpg_jax/rewards.py (reconstruction, look_forward, dino, clip_image, clip_text,
  # or a registered host reward).
  c.dpg.rewards = 'look_forward:1.0'
  c.dpg.gamma = 0.9986             # discount of Eq. 9 (policy term weighted by gamma**t)
  c.dpg.instance_mse_weight = 0.0  # ||eps - eps_hat||^2 on instance images (0 = authors' look-forward)
  # The critic: 'faithful' = the authors' (SGD 0.01, raw targets); see critic.critic_config.
  c.dpg.critic = critic.critic_config('faithful')
  c.dpg.critic.input = 'auto'      # auto = each reward's own (residual for look_forward, x0_hat for dino)
  c.dpg.dino_model = 'facebook/dino-vits16'          # hub id, HF dir or original DINO .pth
  c.dpg.clip_model = 'openai/clip-vit-base-patch32'  # hub id or HF dir
  c.dpg.tiny_encoders = False      # build tiny random DINO/CLIP in the workdir (tests, demos)
  c.dpg.reference_mode = 'mean'    # mean | per_image reference embedding for dino/clip_image
  c.dpg.dino_direct = False        # differentiate the DINO cost directly (no critic for it)

  # --- Sampling (previews during training and `--mode=sample`) ----------------
  c.sample = ml_collections.ConfigDict()
  # Placeholders in prompts and prompt templates: {identifier}, {class_noun} only.
  c.sample.prompts = ('a photo of {identifier} {class_noun}',
                      'a {identifier} {class_noun} on the beach')
  c.sample.negative_prompt = ''
  c.sample.seed = 0
  c.sample.num_images_per_prompt = 4
  c.sample.scheduler = 'ddim'      # ddim | pndm | dpm_solver
  c.sample.num_inference_steps = 50
  c.sample.guidance_scale = 7.5
  c.sample.batch_size = 8          # images per compiled call (global; split over devices)
  c.sample.source = ''             # --mode=sample: workdir or exported pipeline dir ('' = --workdir)
  c.sample.output_dir = ''         # --mode=sample: '' = <workdir>/samples

  # --- Loop side effects ------------------------------------------------------
  # Cadences in steps, each an integer >= 0; 0 = only at the end. SIGTERM/SIGINT
  # also save the current step (exit code 143/130; rerun to resume). A resume
  # may change these, num_steps, sample.* and mesh.*; a change of any key that
  # shapes the state or the result (model, data, rewards, optimiser, ...) is
  # refused: see dpg_jax/run_config.py.
  c.log_every = 10
  c.checkpoint_every = 250
  c.max_to_keep = 2                # >= 1; the newest intact one is the resume point
  c.sample_every = 500             # 0 = only at the end; sample.prompts=() = never
  c.export = True                  # export the fine-tuned pipeline at the end of training:
  c.export_format = 'both'         # flax: <workdir>/export | torch: <workdir>/export_torch | both
  c.export_fp16 = False            # torch export: also write diffusers variant='fp16' weights

  # --- Devices ----------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  # Axis sizes (dpg_jax/sharding.py); one may be -1 = the devices the others leave.
  c.mesh.data = -1                 # batch split, parameters replicated along it
  c.mesh.fsdp = 1                  # batch split, large parameters + optimiser slots split too
  # replicate | fsdp (shard by the rule table sharding.PARAM_RULES over the 'fsdp' axis;
  # with the default sizes, fsdp means data=1, fsdp=-1: all devices).
  c.mesh.param_sharding = 'replicate'
  c.mesh.rules = ()                # extra ('regex=replicate|fsdp', ...) over leaf paths, tried first
  # Multi-host (dpg_jax/distributed.py): None = auto (a coordinator in the environment,
  # a multi-task SLURM step or a multi-host TPU VM), True = always, False = never.
  c.distributed = config_dict.placeholder(bool)
  c.cluster = ml_collections.ConfigDict()
  c.cluster.coordinator_address = ''  # 'host:port' of process 0 ('' = detected / DPG_JAX_COORDINATOR)
  c.cluster.num_processes = 0         # 0 = detected / DPG_JAX_NUM_PROCESSES
  c.cluster.process_id = -1           # -1 = detected / DPG_JAX_PROCESS_ID
  c.cluster.local_device_ids = ''     # e.g. '0,1' ('' = all of this host's)
  # Persistent XLA compilation cache: '' = <user cache dir>/dpg_jax/xla (e.g.
  # ~/.cache/dpg_jax/xla; $XDG_CACHE_HOME respected); 'none' switches it off.
  c.compilation_cache_dir = ''
  return c

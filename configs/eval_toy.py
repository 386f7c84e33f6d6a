"""The toy DreamBench: the methods compared offline on the toy world, with error bars.

PLACEHOLDER DOCSTRING (sized below)
"""
from configs import eval_dreambench

METHODS = ('toy_dreambooth', 'toy_dpg_faithful', 'toy_dpg_robust', 'toy_dpg_dino',
           'toy_dpg_clip_t')


def get_config():
  c = eval_dreambench.get_config()
  c.methods = METHODS
  c.dataset = 'toyworld'
  c.dataset_dir = ''
  c.subjects = ()
  c.train_seeds = (0, 1, 2)
  c.seed = 0
  c.images_per_prompt = 2
  c.sample.scheduler = 'ddim'
  c.sample.num_inference_steps = 20
  c.sample.guidance_scale = 4.0
  c.sample.batch_size = 26
  c.scorer.dino_model = 'toyworld'
  c.scorer.clip_model = 'toyworld'
  c.scorer.judge = 'toyworld'
  c.scorer.batch_size = 32
  return c

"""DreamBooth on SD1.4: the DPG paper's baseline settings (method.md).

512 px, lr 1e-6 constant, 1000 steps, batch 1 instance + 1 class image, 8 class
images, text encoder trained, prior weight 1.0.

  python -m dpg_jax.main --config=configs/dreambooth.py --workdir=runs/dog \
    --config.data.instance_dir=photos/dog --config.data.class_noun=dog
"""
from configs import default


def get_config():
  c = default.get_config()
  c.model.pretrained = 'CompVis/stable-diffusion-v1-4'
  c.data.resolution = 512
  c.data.num_class_images = 8
  c.num_steps = 1000
  c.batch_size = 1
  c.learning_rate = 1e-6
  c.train_text_encoder = True
  c.prior_loss_weight = 1.0
  return c

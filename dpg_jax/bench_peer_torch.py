"""An independent PyTorch train step of the same work, for `dpg_jax.bench --peer_python`.

Run by the benchmark with the Python of a separate environment that has torch,
diffusers and transformers (never dpg_jax's own: torch is not one of its
dependencies, and this file imports nothing from dpg_jax or jax):

  <peer-python> dpg_jax/bench_peer_torch.py spec.json out.json

spec.json: {"unet": {...diffusers UNet config...}, "text_encoder": {...CLIP text
config...}, "latent_hw": 32, "batch_size": 1, "prior_preservation": true,
"grad_accum_steps": 1, "train_text_encoder": false, "variant": "dreambooth" | "dpg", "steps": 3,
"learning_rate": 1e-6, "max_grad_norm": 1.0, "gamma": 0.9986}

The step is DreamBooth (instance + prior MSE) or the DPG look-forward step
(prior MSE + gamma^t Q((x_0 - x0_hat)^2) through the authors' critic, then one
SGD step of the critic on the detached residual), with AdamW and global-norm
clipping, VAE latents precomputed: what dpg_jax's step does. Weights are random
(speed does not depend on them). Writes per-step seconds and peak RSS.
"""
import json
import os
import resource
import statistics
import sys
import time


def _critic(torch, latent_channels, hw):
  """The authors' FullyConvRegressionModel, their init."""
  nn = torch.nn

  class Critic(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv = nn.Conv2d(latent_channels, 1, 3, padding=1)
      self.fc1 = nn.Linear(hw * hw, 64)
      self.fc2 = nn.Linear(64, 1)
      for layer, bound in ((self.conv, 1 / 9), (self.fc1, 1 / 4096), (self.fc2, 1 / 64)):
        nn.init.uniform_(layer.weight, 0, bound)
        nn.init.uniform_(layer.bias, 0, bound)

    def forward(self, x):
      x = torch.nn.functional.leaky_relu(self.conv(x), 0.01).flatten(1)
      return self.fc2(torch.relu(self.fc1(x)))[:, 0]

  return Critic()


def _peak_rss_bytes():
  """VmHWM (ru_maxrss would carry the parent's peak across fork+exec)."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) * 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(spec_path, out_path):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  from transformers import CLIPTextConfig, CLIPTextModel  # pylint: disable=g-import-not-at-top

  with open(spec_path) as f:
    spec = json.load(f)
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  unet = UNet2DConditionModel(**spec['unet']).train()
  te_cfg = CLIPTextConfig(**spec['text_encoder'])
  train_te = spec['train_text_encoder']
  te = CLIPTextModel(te_cfg).train() if train_te else None
  params = list(unet.parameters()) + (list(te.parameters()) if train_te else [])
  opt = torch.optim.AdamW(params, lr=spec['learning_rate'], betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=1e-2)
  b, hw, c = spec['batch_size'], spec['latent_hw'], spec['unet']['in_channels']
  n = 2 * b if spec['prior_preservation'] else b
  dpg = spec['variant'] == 'dpg'
  critic = _critic(torch, c, hw) if dpg else None
  copt = torch.optim.SGD(critic.parameters(), lr=0.01) if dpg else None
  betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
  abar_all = torch.cumprod(1 - betas, 0).float()
  k = spec.get('grad_accum_steps', 1)
  micro_latents = [torch.randn(n, c, hw, hw) for _ in range(k)]   # precomputed VAE latents
  ids = torch.randint(0, min(1000, te_cfg.vocab_size), (n, 77))
  context = None if train_te else torch.randn(n, 77, te_cfg.hidden_size)

  def micro(latents):
    """One micro-batch's forward and backward (gradients accumulate in .grad)."""
    eps = torch.randn_like(latents)
    t = torch.randint(0, 1000, (n,))
    a = abar_all[t][:, None, None, None]
    x_t = a.sqrt() * latents + (1 - a).sqrt() * eps
    ctx = te(ids)[0] if train_te else context
    pred = unet(x_t, t, ctx).sample
    prior = torch.mean((pred[b:] - eps[b:]) ** 2) if n > b else pred.new_zeros(())
    if dpg:
      x0_hat = (x_t[:b] - (1 - a[:b]).sqrt() * pred[:b]) / a[:b].sqrt()
      resid = (latents[:b] - x0_hat) ** 2
      loss = torch.mean(spec['gamma'] ** t[:b].float() * critic(resid)) + prior
    else:
      loss = torch.mean((pred[:b] - eps[:b]) ** 2) + prior
    (loss / k).backward()
    return loss, (resid.detach() if dpg else None)

  def step():
    opt.zero_grad(set_to_none=True)
    out = [micro(latents) for latents in micro_latents]
    torch.nn.utils.clip_grad_norm_(params, spec['max_grad_norm'])
    opt.step()
    if dpg:   # the critic's SGD step on every micro-batch's detached residual
      r = torch.cat([resid for _, resid in out])
      copt.zero_grad(set_to_none=True)
      closs = torch.mean((critic(r) - r.mean((1, 2, 3))) ** 2)
      closs.backward()
      copt.step()
    return float(sum(loss for loss, _ in out) / k)

  step()  # warm-up (allocator, oneDNN primitive caches)
  times = []
  for _ in range(spec['steps']):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  out = {'torch': torch.__version__, 'threads': torch.get_num_threads(), 'times': times,
         's_per_step': statistics.median(times), 's_per_step_min': min(times),
         'peak_rss_gib': _peak_rss_bytes() / 2**30}
  with open(out_path, 'w') as f:
    json.dump(out, f)


if __name__ == '__main__':
  main(*sys.argv[1:3])

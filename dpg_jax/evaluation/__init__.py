"""DreamBench evaluation: DINO, CLIP-I and CLIP-T (+ the toy-world judge), and a resumable driver.

  python -m dpg_jax.evaluate --config=configs/eval_tiny.py --workdir=/tmp/dpg_eval_tiny
  python -m dpg_jax.evaluate --config=configs/eval_dreambench.py --workdir=runs/eval

  scorer.py   metric encoders -> per-image and per-prompt scores, the real-image row
  ledger.py   the workdir's record of finished runs and units: what a rerun skips
  report.py   ledger records -> Table 1 (overall, live, object, per subject), grids
  plan.py     the subjects, and each (method, subject)'s training config and fingerprint
  driver.py   `run`: subjects x methods x prompts through training, sampling and the above

Outputs, in the workdir:

  ledger.jsonl                      one JSON line per finished unit (+ 'real' rows)
  images/<method>/<subject>/<fingerprint>/<prompt>_<seed>.png   generated images
  grids/<method>/<subject>.png      rows = prompts, columns = seeds
  results.json, results.md          per prompt / subject / group / overall
  (with config key train_seeds, runs/, images/ and grids/ get a seed<k> level
  below <subject>)
"""
from dpg_jax.evaluation.driver import run
from dpg_jax.evaluation.driver import validate_config

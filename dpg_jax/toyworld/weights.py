"""Where the shipped toy-world models live, and the check that they are intact.

  shipped/base/          the pretrained toy SD (diffusers layout, Flax msgpack)
  shipped/judge.msgpack  the attribute classifier
  shipped/dino/          the toy DINO (a ViT in the HF layout dpg_jax.encoders loads)
  shipped/clip/          the toy CLIP (vision + text towers and tokenizer, HF layout)
  shipped/record.json    how they were made (commit, config, steps, final
                         losses, timings) and the sha256 of every file

Rebuilt by `python -m dpg_jax.toyworld.pretrain --workdir=DIR --out=<this folder>`.
"""
import hashlib
import json
import os

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'shipped')
BASE_DIR = os.path.join(WEIGHTS_DIR, 'base')
JUDGE_PATH = os.path.join(WEIGHTS_DIR, 'judge.msgpack')
DINO_DIR = os.path.join(WEIGHTS_DIR, 'dino')   # HF ViT layout (encoders.load_dino)
CLIP_DIR = os.path.join(WEIGHTS_DIR, 'clip')   # HF CLIP layout (encoders.load_clip)
RECORD_PATH = os.path.join(WEIGHTS_DIR, 'record.json')


def sha256(path):
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def file_hashes(root):
  """{relative path: sha256} of every file under root except record.json."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      rel = os.path.relpath(p, root)
      if rel != 'record.json':
        out[rel] = sha256(p)
  return dict(sorted(out.items()))


def record(folder: str = WEIGHTS_DIR) -> dict:
  with open(os.path.join(folder, 'record.json')) as f:
    return json.load(f)


def verify(folder: str = WEIGHTS_DIR) -> dict:
  """The record, after checking every shipped file against its sha256; raises on a mismatch."""
  rec = record(folder)
  got = file_hashes(folder)
  if got != rec['files']:
    bad = sorted(k for k in got.keys() | rec['files'].keys()
                 if got.get(k) != rec['files'].get(k))
    raise ValueError(f'{folder}: shipped toy-world files differ from record.json: '
                     f'{", ".join(bad)}; rebuild with python -m dpg_jax.toyworld.pretrain.')
  return rec

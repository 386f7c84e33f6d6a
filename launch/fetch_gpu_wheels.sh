#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels the GPU image lacks, into .whl/ (git-ignored),
# for Python 3.12 x86-64, so `launch/gpu_check.sh` can install them there with no network.
set -euo pipefail
cd "$(dirname "$0")/.."
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
for pkg in diffusers==0.39.0 transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2 \
           ml_collections==1.1.0 tensorboardX==2.6.5; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp $plat -d .whl "$pkg"
done
ls -la .whl

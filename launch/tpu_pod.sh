#!/usr/bin/env bash
# Multi-host TPU VM job: the same command on every worker; jax.distributed wires them up.
#   TPU_NAME=my-v4-32 ZONE=us-central2-b CONFIG=configs/dreambooth_dpg.py WORKDIR=gs://bucket/runs/dog \
#     launch/tpu_pod.sh --config.data.instance_dir=/data/dog
# Assumes the repo is cloned at ~/dpg_jax on every worker (see the first command below).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}"
CONFIG=${CONFIG:-configs/dreambooth_dpg.py}
REPO=${REPO:-https://github.com/your-org/dpg_jax.git}
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }
ssh_all "test -d ~/dpg_jax || git clone $REPO ~/dpg_jax; cd ~/dpg_jax && python3 -m pip install -q -e '.[tpu]'"
ssh_all "cd ~/dpg_jax && python3 -m dpg_jax.main --config=$CONFIG --workdir=$WORKDIR \
  --config.distributed=True $*"

#!/usr/bin/env bash
# Train on a Cloud TPU VM (one host or a multi-host slice): create the VM if it does not
# exist, copy this checkout to every worker, install it, run dpg_jax.main on all workers
# at once (jax.distributed detects the slice), and print where the results are.
#
#   launch/tpu_vm.sh [-n NAME] [-z ZONE] [-a ACCELERATOR] [-r RUNTIME] [-P PROJECT] \
#       [-c CONFIG] -w gs://BUCKET/RUN [-s] -- [--config.KEY=VALUE ...]
#   launch/tpu_vm.sh -w gs://my-bucket/runs/dog -- --config.data.subject=dog
#
#   -n NAME         TPU VM name                   (default $TPU_NAME or dpg-jax)
#   -z ZONE         zone                          (default $ZONE or us-central2-b)
#   -a ACCELERATOR  accelerator type              (default $ACCELERATOR or v4-8)
#   -r RUNTIME      TPU software version          (default $RUNTIME or tpu-ubuntu2204-base)
#   -P PROJECT      GCP project                   (default $PROJECT or gcloud's configured one)
#   -c CONFIG       config file                   (default configs/dreambooth_dpg.py)
#   -w WORKDIR      gs:// workdir shared by all workers (required: checkpoints, metrics,
#                   samples and the export land there)
#   -s              spot VM (preemptible; a preempted run saves and exits 143: rerun to resume)
# Everything after -- goes to dpg_jax.main.
set -euo pipefail
NAME=${TPU_NAME:-dpg-jax}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-8}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
PROJECT=${PROJECT:-}
CONFIG=configs/dreambooth_dpg.py
WORKDIR=${WORKDIR:-}
SPOT=()
while getopts "n:z:a:r:P:c:w:s" opt; do
  case $opt in
    n) NAME=$OPTARG ;;
    z) ZONE=$OPTARG ;;
    a) ACCELERATOR=$OPTARG ;;
    r) RUNTIME=$OPTARG ;;
    P) PROJECT=$OPTARG ;;
    c) CONFIG=$OPTARG ;;
    w) WORKDIR=$OPTARG ;;
    s) SPOT=(--spot) ;;
    *) sed -n '2,21p' "$0" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [[ "${1:-}" == "--" ]]; then shift; fi
if [[ "$WORKDIR" != gs://* ]]; then
  echo "tpu_vm.sh: -w must be a gs:// workdir (all workers write there), got '${WORKDIR}'" >&2
  exit 2
fi
REPO_DIR=$(cd "$(dirname "$0")/.." && pwd)
GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone "$ZONE")
if [[ -n "$PROJECT" ]]; then COMMON+=(--project "$PROJECT"); fi

if ! "${GCLOUD[@]}" describe "$NAME" "${COMMON[@]}" >/dev/null 2>&1; then
  echo "Creating TPU VM $NAME ($ACCELERATOR, $RUNTIME) in $ZONE"
  "${GCLOUD[@]}" create "$NAME" "${COMMON[@]}" --accelerator-type "$ACCELERATOR" \
    --version "$RUNTIME" "${SPOT[@]}"
else
  echo "Reusing TPU VM $NAME in $ZONE"
fi

# This checkout (tracked files, as committed or edited) to every worker.
ARCHIVE=$(mktemp -t dpg_jax_XXXX.tar.gz)
trap 'rm -f "$ARCHIVE"' EXIT
(cd "$REPO_DIR" && git ls-files -z | tar --null -czf "$ARCHIVE" -T -)
"${GCLOUD[@]}" scp "$ARCHIVE" "$NAME:~/dpg_jax.tar.gz" "${COMMON[@]}" --worker=all
"${GCLOUD[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command \
  "mkdir -p ~/dpg_jax && tar -xzf ~/dpg_jax.tar.gz -C ~/dpg_jax && cd ~/dpg_jax && \
   python3 -m pip install -q -e '.[tpu]'"

ARGS=$(printf ' %q' "$@")
echo "Running on all workers of $NAME: dpg_jax.main --config=$CONFIG --workdir=$WORKDIR$ARGS"
"${GCLOUD[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command \
  "cd ~/dpg_jax && python3 -m dpg_jax.main --config=$CONFIG --workdir=$WORKDIR \
   --config.distributed=True$ARGS"

echo "Done. Results in $WORKDIR:"
echo "  checkpoints  $WORKDIR/checkpoints"
echo "  metrics      $WORKDIR/metrics.jsonl   (tensorboard --logdir $WORKDIR/tb)"
echo "  samples      $WORKDIR/samples"
echo "  export       $WORKDIR/export (and export_torch)"
echo "Delete the VM when done: gcloud compute tpus tpu-vm delete $NAME --zone $ZONE"

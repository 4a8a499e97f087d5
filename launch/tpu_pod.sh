#!/usr/bin/env bash
# Trains on a Cloud TPU VM pod slice: create it, install the project on every
# worker, run the training command on all workers at once (output streamed
# here), then delete the slice.
#
#   PROJECT=my-project ZONE=us-central2-b TPU_NAME=mrl-v4-16 ACCELERATOR_TYPE=v4-16 \
#   RUNTIME_VERSION=tpu-ubuntu2204-base REPO=https://github.com/you/mrl_jax.git \
#   CONFIG=configs/resnet50_imagenet.py WORKDIR=gs://my-bucket/mrl_r50 launch/tpu_pod.sh
#
#   launch/tpu_pod.sh create|install|train|delete   one stage only (default: all four)
#
# Required variables (nothing project-specific is built in):
#   PROJECT           Google Cloud project id.
#   ZONE              zone with TPU capacity, e.g. us-central2-b.
#   TPU_NAME          name for the TPU VM slice.
#   ACCELERATOR_TYPE  slice type, e.g. v4-16, v5litepod-16.
#   RUNTIME_VERSION   TPU VM image, e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5-lite.
#   REPO              git URL of this project, cloned on every worker.
#   CONFIG            config file (and :args) inside the repo, e.g. configs/resnet50_imagenet.py.
#   WORKDIR           checkpoints, metrics and probe outputs; every process writes
#                     its shards of each checkpoint there, so all workers must
#                     reach the same place. Normally a bucket, gs://BUCKET/RUN:
#                     the workers read and write it directly (Orbax through
#                     TensorStore, the other files through etils.epath and gcsfs,
#                     which requirements.txt installs). The slice's service account
#                     needs read and write on the bucket (e.g. roles/storage.objectAdmin
#                     on it) and the storage scope: the default Compute Engine account
#                     with CREATE_ARGS="--scopes=https://www.googleapis.com/auth/cloud-platform",
#                     or your own with --service-account=... too. A directory that
#                     every worker mounts at the same path (NFS/Filestore) works as well.
# Optional:
#   REF               branch, tag or commit to check out (default: the repo's default branch).
#   TRAIN_ARGS        more flags for mrl_jax.main, e.g.
#                     "--config.data.data_dir=gs://BUCKET/tfds" (a dataset prepared
#                     there: array_record reads records from a bucket but cannot write
#                     them) or a path every worker has (local copy, gcsfuse mount).
#   CREATE_ARGS       more flags for `tpu-vm create`, e.g. "--spot".
#   KEEP_TPU=1        do not delete the slice at the end (after a failure either).
#   DRY_RUN=1         print the gcloud commands instead of running them.
#
# Each worker runs one process of the job. JAX finds the other workers itself
# (MRL_DISTRIBUTED=jax, see mrl_jax/distributed.py) and mrl_jax.main trains as
# one program over all chips; only process 0 writes metrics. Every worker keeps
# its output in ~/mrl_train.log. A dropped connection ends the ssh sessions and
# with them the training processes: run this inside tmux/screen, and rerun the
# `train` stage to resume from the last checkpoint.
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
KEEP_TPU="${KEEP_TPU:-0}"
REF="${REF:-}"
TRAIN_ARGS="${TRAIN_ARGS:-}"
CREATE_ARGS="${CREATE_ARGS:-}"

missing=()
for var in PROJECT ZONE TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION REPO CONFIG WORKDIR; do
  if [[ -z "${!var:-}" ]]; then missing+=("$var"); fi
done
if ((${#missing[@]})); then
  echo "tpu_pod.sh: set ${missing[*]} (see the top of $0)" >&2
  exit 2
fi

# A relative WORKDIR would name a different local folder on every worker.
if [[ ! "$WORKDIR" =~ ^[A-Za-z][A-Za-z0-9+.-]*:// && "$WORKDIR" != /* ]]; then
  echo "tpu_pod.sh: WORKDIR=$WORKDIR is a relative path; use a bucket (gs://BUCKET/RUN) or an absolute path that every worker mounts" >&2
  exit 2
fi

# Runs (or, with DRY_RUN=1, prints as shell words one can paste) one command.
run() {
  if [[ "$DRY_RUN" != 1 ]]; then
    "$@"
    return
  fi
  local word words=()
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      words+=("$word")
    else
      words+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${words[*]}"
}

tpu_vm=(gcloud compute tpus tpu-vm)
where=("--project=$PROJECT" "--zone=$ZONE")

# Runs shell code $1 on every worker of the slice at once.
on_all_workers() {
  run "${tpu_vm[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"
}

create() {
  local extra=()
  read -r -a extra <<< "$CREATE_ARGS"
  run "${tpu_vm[@]}" create "$TPU_NAME" "${where[@]}" \
    "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION" "${extra[@]}"
}

install() {
  local checkout="git -C mrl_jax pull --ff-only"
  if [[ -n "$REF" ]]; then
    checkout="git -C mrl_jax fetch --all --tags && git -C mrl_jax checkout $(printf '%q' "$REF")"
  fi
  on_all_workers "set -e; if [ ! -d mrl_jax ]; then git clone $(printf '%q' "$REPO") mrl_jax; fi; \
$checkout; python3 -m venv ~/mrl_venv; . ~/mrl_venv/bin/activate; pip install -q -U pip; \
pip install -q -U \"jax[tpu]\" -r mrl_jax/requirements.txt; pip install -q -e mrl_jax"
}

train() {
  on_all_workers "set -o pipefail; cd mrl_jax && . ~/mrl_venv/bin/activate && \
MRL_DISTRIBUTED=jax python -m mrl_jax.main --config=$(printf '%q' "$CONFIG") \
--workdir=$(printf '%q' "$WORKDIR") $TRAIN_ARGS 2>&1 | tee ~/mrl_train.log"
}

delete() {
  run "${tpu_vm[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
}

stage="${1:-all}"
case "$stage" in
  create | install | train | delete) "$stage" ;;
  all)
    create
    if [[ "$KEEP_TPU" != 1 ]]; then
      # Deleted on any exit from here on, failures included: an idle slice still bills.
      trap delete EXIT
    fi
    install
    train
    ;;
  *)
    echo "tpu_pod.sh: unknown stage '$stage' (use create, install, train, delete or all)" >&2
    exit 2
    ;;
esac

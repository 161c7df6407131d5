#!/usr/bin/env bash
# maxllama on a Cloud TPU VM slice: the same command on every worker; JAX finds the slice's topology itself.
#   launch/tpu_vm/train.sh TPU_NAME ZONE experiments/llama4_scout.yaml run.dir=gs://bucket/runs/scout
set -euo pipefail
tpu="${1:?usage: train.sh TPU_NAME ZONE CONFIG [KEY=VALUE ...]}"; zone="${2:?zone}"; shift 2
repo="${MAXLLAMA_REPO:-https://github.com/your-org/maxllama.git}"
args=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  set -e
  [ -d maxllama ] || git clone -q '$repo' maxllama
  cd maxllama && make install PYTHON=python3 >/dev/null
  .venv/bin/pip install -q 'jax[tpu]'
  .venv/bin/maxllama train $args
"

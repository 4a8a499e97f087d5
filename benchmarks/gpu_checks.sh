#!/usr/bin/env bash
# The GPU session's one prepared script: versions, the head benchmark, the GPU
# tests, the quickstart and a ResNet-50 runlocal, logs and JSON into $OUT.
# Run from the repo root on a machine whose JAX sees a GPU:
#   OUT=/tmp/out bash benchmarks/gpu_checks.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD" XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT="${OUT:-/tmp/mrl_gpu_out}"; mkdir -p "$OUT"
python3 -c "import jax, flax, optax, orbax.checkpoint as o, grain, tensorflow_datasets as t; print(jax.__version__, flax.__version__, optax.__version__, o.__version__, t.__version__, jax.devices())" 2>&1 | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$OUT/versions.txt"
for batch in 256 1024; do
  python3 benchmarks/nested_head.py --batch "$batch" --repeats 50 --out "$OUT/nested_head_b$batch.json" 2>&1 | grep -v "^W\|^I" | tee -a "$OUT/bench.txt"
done
python3 -m pytest -q -x tests/test_gpu.py tests/test_nested_head.py tests/test_losses.py 2>&1 | tail -5 | tee "$OUT/pytest.txt"
(time python3 -m mrl_jax.main --config configs/quickstart.py --workdir /tmp/qs --config.data.data_dir=/tmp/tfds) 2>&1 | grep -v "^W1\|^I1\|^WARNING" | tail -14 | tee "$OUT/quickstart.txt"
(time python3 -m mrl_jax.main --config configs/resnet50_imagenet.py:runlocal --workdir /tmp/r50) 2>&1 | grep -v "^W1\|^I1\|^WARNING" | tail -8 | tee "$OUT/r50_runlocal.txt"

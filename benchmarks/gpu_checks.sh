#!/usr/bin/env bash
# The GPU session's prepared script: logs and JSON into $OUT. Run from the repo
# root on a machine whose JAX sees a GPU, naming the stages to run (default: all):
#   OUT=/tmp/out bash benchmarks/gpu_checks.sh [versions] [vit] [retrieval] [heads] [bert] [tests] [train]
#   versions   library versions and the GPU
#   vit        ViT-B/16 step time with MRL / MRL-E / plain heads (18,291 classes),
#              and compile_check memory of vit_jft at 128 per device, remat off/on
#   retrieval  1M x 2048 MRL index adaptive / funnel plans (exact shortlists) against exact
#              search (numpy on the host, and the index's exact plan on the device)
#   heads      nested-head micro-benchmark at batch 256 and 1024
#   bert       BERT-Base MLM train step, nested head 12..768 vs the plain decoder,
#              seq 128, batch 8 and 64, float32 and bfloat16
#   tests      the GPU-marked tests and the head, loss and ViT tests
#   train      quickstart, resnet50_imagenet:runlocal and vit_jft:runlocal
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-}:$PWD" XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT="${OUT:-/tmp/mrl_gpu_out}"; mkdir -p "$OUT"
STAGES="${*:-versions vit retrieval heads bert tests train}"
quiet() { grep -v "^W1\|^I1\|^WARNING"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

if has versions; then
  python3 -c "import jax, flax, optax, orbax.checkpoint as o, grain, tensorflow_datasets as t; print(jax.__version__, flax.__version__, optax.__version__, o.__version__, t.__version__, jax.devices())" 2>&1 | tee "$OUT/versions.txt"
  nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$OUT/versions.txt"
fi
if has vit; then
  timeout 300 python3 benchmarks/vit_head_overhead.py --variant B/16 --classes 18291 --batch 128 \
    --image 224 --dtype bfloat16 --repeats 20 --out "$OUT/vit_head_overhead.json" 2>&1 | quiet | tee "$OUT/vit_head_overhead.txt"
  for remat in False True; do
    timeout 150 python3 -m mrl_jax.main --config configs/vit_jft.py --workdir "/tmp/cc_$remat" \
      --mode=compile_check --config.mesh.fsdp=1 --config.mesh.model=1 --config.batch_size=128 \
      --config.model.remat=$remat 2>&1 | quiet | tail -14 | tee "$OUT/compile_check_remat_$remat.txt"
  done
fi
if has retrieval; then
  timeout 500 python3 benchmarks/retrieval.py --num_database 1000000 --dim 2048 --num_queries 1000 \
    --methods exact,mrl --mrl_ann "" --shortlist_dims 16,32 --shortlist_sizes 100,200,400 \
    --scratch /tmp/retrieval_scratch --repeats 3 --out "$OUT/retrieval_1m.json" 2>&1 | quiet | tee "$OUT/retrieval_1m.txt"
fi
if has heads; then
  for batch in 256 1024; do
    python3 benchmarks/nested_head.py --batch "$batch" --repeats 50 --out "$OUT/nested_head_b$batch.json" 2>&1 | quiet | tee -a "$OUT/bench.txt"
  done
fi
if has bert; then
  for args in "--batch 8 --dtype float32" "--batch 8 --dtype bfloat16" "--batch 64 --dtype bfloat16"; do
    name="bert_step_$(echo $args | tr -d ' -' | sed 's/batch/b/;s/dtype//')"
    timeout 300 python3 benchmarks/bert_step.py --variant base --seq 128 $args --repeats 30 \
      --out "$OUT/$name.json" 2>&1 | quiet | tee -a "$OUT/bert_step.txt"
  done
fi
if has tests; then
  timeout 300 python3 -m pytest -q -x tests/test_gpu.py tests/test_nested_head.py tests/test_losses.py \
    tests/test_vit.py 2>&1 | tail -5 | tee "$OUT/pytest.txt"
fi
if has train; then
  (time python3 -m mrl_jax.main --config configs/quickstart.py --workdir /tmp/qs --config.data.data_dir=/tmp/tfds) 2>&1 | quiet | tail -14 | tee "$OUT/quickstart.txt"
  (time python3 -m mrl_jax.main --config configs/resnet50_imagenet.py:runlocal --workdir /tmp/r50) 2>&1 | quiet | tail -8 | tee "$OUT/r50_runlocal.txt"
  (time python3 -m mrl_jax.main --config configs/vit_jft.py:runlocal --workdir /tmp/vit --config.data.data_dir=/tmp/tfds) 2>&1 | quiet | tail -12 | tee "$OUT/vit_jft_runlocal.txt"
fi

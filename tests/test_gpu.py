"""Checks that only mean something on a GPU (skipped elsewhere): GPU numerics of the head, bf16 training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mrl_jax import train
from mrl_jax.models.nested_head import NestedHead, naive_nested_logits


@pytest.mark.gpu
@pytest.mark.parametrize("efficient", [False, True])
def test_batched_head_matches_naive_loop_on_gpu(efficient):
  dims = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
  head = NestedHead(dims, 1000, efficient=efficient, rngs=nnx.Rngs(0))
  z = jax.random.normal(jax.random.key(1), (64, 2048))
  kernels = head.per_size_kernels()
  biases = [head.bias[...]] * len(dims) if efficient else list(head.bias[...])
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(head(z), naive_nested_logits(z, kernels, biases, dims),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_bfloat16_training_on_gpu(digits_data_dir, tmp_path):
  from configs import quickstart
  config = quickstart.get_config("runlocal")
  config.data.data_dir = digits_data_dir
  config.compute_dtype = "bfloat16"
  config.total_steps = 20
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert jax.devices()[0].platform == "gpu"
  assert all(np.isfinite(v) for v in summary["val_loss"].values())

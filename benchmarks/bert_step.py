"""Step-time cost of the nested MLM head on BERT: nesting 12..768 vs the plain decoder.

    python benchmarks/bert_step.py [--variant base --seq 128 --batch 8 --repeats 20
        --dtype float32 --out results.json]

Builds `BertMLM` (`build_bert_mlm`, the tied decoder over the word embeddings)
twice, with the nested head (nesting 12, 24, ..., 768: every size that fits
the width) and with the plain decoder (nesting (width,)), and times the full
jitted train step of each: forward with dropout, the nested softmax
cross-entropy over the masked positions (unit weights; the decoder and loss
fused as `MaskedLMTask.loss` trains, `BertMLM.mlm_sums`; `--compare-unfused`
adds both heads with the logits [n, B, P, V] into `losses.nested_softmax_xent`,
the path before the fusion), backward, and BERT's AdamW update (`optim.build_optimizer`:
b2 0.999, eps 1e-6, weight decay 0.01 off LayerNorm and biases, clip 1.0).
Synthetic token ids, `--predictions` masked positions per sequence (default
15% of `--seq`, BERT's max_predictions_per_seq), vocabulary `--vocab` (30,522,
BERT's WordPiece). Steps of the two models are interleaved (one of each per
round, each waited on) so load from other processes hits both alike; reports
the median step time, the median process CPU time per step and the overhead
nested / plain - 1. The paper's target: under 2% for BERT-Base at seq 128.

`--decoder-only` times the decoder + loss alone (forward + backward w.r.t. the
transformed vectors h [batch, predictions, d], E and b, an SGD update), fused
and unfused, for both heads.

On a CPU use a smaller model, e.g. `--variant mini --seq 128 --batch 8`
(nesting 12..192 on width 256) or `--variant base --seq 64 --batch 2`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from mrl_jax import losses, optim
from mrl_jax.models import bert
from mrl_jax.models.nested_head import prefix_sum_logits
from mrl_jax.models.nested_mlm_head import nested_xent_sums
from mrl_jax.nesting import Nesting
from mrl_jax.tasks import mlm

PAPER_DIMS = (12, 24, 48, 96, 192, 384, 768)


def nested_dims(width: int) -> tuple[int, ...]:
  """The paper's BERT nesting 12..768, cut to the sizes that fit; the width itself last."""
  return tuple(m for m in PAPER_DIMS if m < width) + (width,)


def build_step(variant: str, dims: tuple[int, ...], *, vocab: int, dtype, dropout: float,
               remat: bool, fused: bool = True):
  """(step, state): one jitted train step of BertMLM over `dims`, and its initial state.

  `fused`: the loss `MaskedLMTask.loss` trains with (`BertMLM.mlm_sums`, decoder
  and cross-entropy fused); else the logits [n, B, P, V] into
  `losses.nested_softmax_xent` (the path before the fusion).
  """
  model_cfg = ml_collections.ConfigDict(dict(
      name="bert", variant=variant, dropout=dropout, attention_dropout=dropout, remat=remat))
  model = bert.build_bert_mlm(model_cfg, Nesting.create(dims), vocab_size=vocab, head="mrl_e",
                              dtype=dtype, rngs=nnx.Rngs(params=0, dropout=1))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optim.build_optimizer(ml_collections.ConfigDict(dict(
      name="adamw", b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01,
      decay_norms_and_biases=False, grad_clip_norm=1.0)), optax.constant_schedule(1e-4), params)
  weights = jnp.ones((len(dims),), jnp.float32)

  def loss_fn(params, rest, batch):
    model = nnx.merge(graphdef, params, rest, copy=True)
    if fused:
      sums = model.mlm_sums(batch["input_ids"], masked_positions=batch["masked_positions"],
                            masked_ids=batch["masked_ids"],
                            masked_weights=batch["masked_weights"],
                            attention_mask=batch["attention_mask"], train=True)
      loss = mlm.nested_mlm_xent_of_sums(sums, weights)[0]
      return loss, nnx.split(model, nnx.Param, ...)[2]
    logits = model(batch["input_ids"], masked_positions=batch["masked_positions"],
                   attention_mask=batch["attention_mask"], train=True)  # [n, B, P, V]
    flat = logits.reshape(logits.shape[0], -1, logits.shape[-1])
    loss, _ = losses.nested_softmax_xent(flat, batch["masked_ids"].reshape(-1), weights,
                                         mask=batch["masked_weights"].reshape(-1))
    return loss, nnx.split(model, nnx.Param, ...)[2]  # the advanced dropout RNG

  def step(params, rest, opt_state, batch):
    (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1, 2)), [params, rest, tx.init(params)]


def synthetic_batch(batch: int, seq: int, predictions: int, vocab: int) -> dict:
  rng = np.random.default_rng(0)
  positions = np.stack([np.sort(rng.choice(seq - 2, predictions, replace=False)) + 1
                        for _ in range(batch)])
  return {"input_ids": jnp.asarray(rng.integers(0, vocab, (batch, seq)), jnp.int32),
          "attention_mask": jnp.ones((batch, seq), jnp.int32),
          "masked_positions": jnp.asarray(positions, jnp.int32),
          "masked_ids": jnp.asarray(rng.integers(0, vocab, (batch, predictions)), jnp.int32),
          "masked_weights": jnp.ones((batch, predictions), jnp.float32)}


def build_decoder_step(dims: tuple[int, ...], *, rows: tuple[int, int], width: int, vocab: int,
                       fused: bool):
  """(step, state): decoder + loss alone, fwd + bwd w.r.t. h, E and b (no encoder)."""
  chunks = Nesting.create(dims).chunks
  weights = jnp.ones((len(dims),), jnp.float32)

  def loss_fn(h, embedding, bias, batch):
    if fused:
      sums = nested_xent_sums(h, embedding, bias, chunks, batch["masked_ids"],
                              batch["masked_weights"])
      return mlm.nested_mlm_xent_of_sums(sums, weights)[0]
    logits = prefix_sum_logits(h, embedding, bias, chunks, classes_first=True)
    flat = logits.reshape(logits.shape[0], -1, logits.shape[-1])
    return losses.nested_softmax_xent(flat, batch["masked_ids"].reshape(-1), weights,
                                      mask=batch["masked_weights"].reshape(-1))[0]

  def step(h, embedding, bias, batch):
    loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(h, embedding, bias, batch)
    # An SGD update, so every gradient is computed and written as in training.
    return (*(p - 1e-6 * g for p, g in zip((h, embedding, bias), grads)), loss)

  rng = np.random.default_rng(0)
  return jax.jit(step), [
      jnp.asarray(rng.normal(size=(*rows, width)), jnp.float32),
      jnp.asarray(0.02 * rng.normal(size=(vocab, width)), jnp.float32),
      jnp.zeros((vocab,), jnp.float32)]


def run(variant: str, seq: int, batch: int, predictions: int | None, vocab: int, dtype: str,
        dropout: float, remat: bool, repeats: int, decoder_only: bool = False,
        compare_unfused: bool = False) -> dict:
  width = bert.bert_embedding_dim(variant)
  predictions = predictions or max(1, round(0.15 * seq))
  data = synthetic_batch(batch, seq, predictions, vocab)
  heads = {"nested": (nested_dims(width), True), "plain": ((width,), True)}
  if compare_unfused or decoder_only:
    heads.update({"nested_unfused": (nested_dims(width), False),
                  "plain_unfused": ((width,), False)})
  entries = {}
  for name, (dims, fused) in heads.items():
    if decoder_only:
      step, state = build_decoder_step(dims, rows=(batch, predictions), width=width,
                                       vocab=vocab, fused=fused)
    else:
      step, state = build_step(variant, dims, vocab=vocab, dtype=jnp.dtype(dtype),
                               dropout=dropout, remat=remat, fused=fused)
    start = time.perf_counter()
    *state, loss = step(*state, data)
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - start
    for _ in range(2):
      *state, loss = step(*state, data)
      jax.block_until_ready(loss)
    entries[name] = {"step": step, "state": state, "dims": list(dims),
                     "compile_s": compile_s, "wall": [], "cpu": []}
  for _ in range(repeats):
    for entry in entries.values():
      cpu, start = time.process_time(), time.perf_counter()
      *entry["state"], loss = entry["step"](*entry["state"], data)
      jax.block_until_ready(loss)
      entry["wall"].append(time.perf_counter() - start)
      entry["cpu"].append(time.process_time() - cpu)
      entry["loss"] = float(loss)
  results = {"variant": variant, "width": width, "seq": seq, "batch": batch,
             "predictions_per_seq": predictions, "vocab": vocab, "dtype": dtype,
             "dropout": dropout, "remat": remat, "repeats": repeats,
             "measured": "decoder + loss only (fwd + bwd)" if decoder_only else "train step",
             "device": jax.devices()[0].device_kind, "jax": jax.__version__}
  for name, entry in entries.items():
    results[name] = {"dims": entry["dims"], "compile_s": entry["compile_s"],
                     "median_ms": 1e3 * statistics.median(entry["wall"]),
                     "min_ms": 1e3 * min(entry["wall"]),
                     "median_cpu_ms": 1e3 * statistics.median(entry["cpu"]),
                     "last_loss": entry["loss"]}
  nested, plain = results["nested"], results["plain"]
  results["overhead_median"] = nested["median_ms"] / plain["median_ms"] - 1.0
  results["overhead_min"] = nested["min_ms"] / plain["min_ms"] - 1.0
  results["overhead_cpu"] = nested["median_cpu_ms"] / plain["median_cpu_ms"] - 1.0
  if "nested_unfused" in results:
    unfused = results["nested_unfused"]
    results["unfused_overhead_median"] = unfused["median_ms"] / plain["median_ms"] - 1.0
    results["unfused_overhead_cpu"] = unfused["median_cpu_ms"] / plain["median_cpu_ms"] - 1.0
  # Analytic: the nested decoder's extra work is the per-size softmax over the
  # vocabulary; its multiply-adds equal the plain decoder's (d x V per token).
  results["decoder_macs_per_prediction"] = width * vocab
  return results


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="base", choices=list(bert.VARIANTS))
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--predictions", type=int, default=None,
                      help="Masked positions per sequence (default: 15%% of --seq).")
  parser.add_argument("--vocab", type=int, default=30522)
  parser.add_argument("--dtype", default="float32", help="Compute dtype, e.g. bfloat16.")
  parser.add_argument("--dropout", type=float, default=0.1)
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--out", default=None, help="Write the results as JSON here.")
  parser.add_argument("--decoder-only", action="store_true",
                      help="Time only the decoder + loss (fwd + bwd w.r.t. h, E, b), fused "
                      "and unfused, on batch x predictions random vectors.")
  parser.add_argument("--compare-unfused", action="store_true",
                      help="Also time both heads with the logits-then-loss path.")
  args = parser.parse_args()
  r = run(args.variant, args.seq, args.batch, args.predictions, args.vocab, args.dtype,
          args.dropout, args.remat, args.repeats, args.decoder_only, args.compare_unfused)
  print(f"BERT-{args.variant} (width {r['width']}) MLM {r['measured']}, seq {args.seq}, batch "
        f"{args.batch}, {r['predictions_per_seq']} predictions/seq, vocab {args.vocab}, "
        f"{args.dtype}, {r['device']} (median of {args.repeats}, interleaved):")
  print(f"  {'head':14s} {'sizes':>5s} {'ms':>9s} {'min ms':>9s} {'CPU ms':>9s} {'compile s':>9s}")
  for name in [k for k in ("plain", "nested", "plain_unfused", "nested_unfused") if k in r]:
    e = r[name]
    print(f"  {name:14s} {len(e['dims']):5d} {e['median_ms']:9.2f} {e['min_ms']:9.2f} "
          f"{e['median_cpu_ms']:9.2f} {e['compile_s']:9.1f}")
  print(f"  nested overhead: {100 * r['overhead_median']:+.2f}% median, "
        f"{100 * r['overhead_min']:+.2f}% min, {100 * r['overhead_cpu']:+.2f}% CPU time")
  if "unfused_overhead_median" in r:
    print(f"  nested_unfused vs plain: {100 * r['unfused_overhead_median']:+.2f}% median, "
          f"{100 * r['unfused_overhead_cpu']:+.2f}% CPU time")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(r, f, indent=2)


if __name__ == "__main__":
  main()

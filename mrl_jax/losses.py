"""Nested losses and per-size metrics over logits shaped [num_sizes, B, C].

The MRL objective is sum_m c_m * L(W_m z[:m], y): each size's loss is
averaged over the (unmasked) batch, then weighted by c_m and summed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from mrl_jax import sharding
from mrl_jax.nesting import Nesting


def _masked_mean(per_example: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean over the last (batch) axis, counting only rows with mask 1."""
  if mask is None:
    return per_example.mean(axis=-1)
  mask = mask.astype(per_example.dtype)
  return (per_example * mask).sum(axis=-1) / jnp.maximum(mask.sum(), 1.0)


def nested_softmax_xent(logits: jax.Array, labels: jax.Array, weights: jax.Array, *,
                        label_smoothing: float = 0.0,
                        mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Softmax cross-entropy per size for integer labels [B].

  Label smoothing follows PyTorch's `CrossEntropyLoss(label_smoothing=eps)`:
  the target is (1 - eps) * one_hot + eps / C. Returns (weighted total, per-size [n]).
  """
  logits = logits.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[None, :, None], axis=-1)[..., 0]
  if label_smoothing:
    uniform = -log_probs.mean(axis=-1)
    nll = (1.0 - label_smoothing) * nll + label_smoothing * uniform
  per_size = _masked_mean(nll, mask)
  return jnp.sum(jnp.asarray(weights, jnp.float32) * per_size), per_size


def nested_sigmoid_xent(logits: jax.Array, labels: jax.Array, weights: jax.Array, *,
                        mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Sigmoid cross-entropy per size for multi-hot labels [B, C] (multi-label data).

  Summed over classes and averaged over examples, as for JFT-style training.
  """
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.float32)[None]
  per_class = -(labels * jax.nn.log_sigmoid(logits) + (1.0 - labels) * jax.nn.log_sigmoid(-logits))
  per_size = _masked_mean(per_class.sum(axis=-1), mask)
  return jnp.sum(jnp.asarray(weights, jnp.float32) * per_size), per_size


def nested_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """1.0 where a size's top-1 class is right: [num_sizes, B].

  For multi-hot labels, "right" means the top class is one of the true ones
  (precision@1).
  """
  top1 = jnp.argmax(logits, axis=-1)
  if labels.ndim == 2:
    return jnp.take_along_axis(labels[None].astype(jnp.float32), top1[..., None], axis=-1)[..., 0]
  return (top1 == labels[None]).astype(jnp.float32)


def nested_top1(logits: jax.Array, labels: jax.Array,
                mask: jax.Array | None = None) -> jax.Array:
  """Top-1 accuracy per size: [num_sizes]."""
  return _masked_mean(nested_correct(logits, labels), mask)


def nested_loss(config: ml_collections.ConfigDict, logits: jax.Array, labels: jax.Array,
                weights: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(weighted total loss, per-size losses) of `config.loss` for integer or multi-hot labels.

  "sigmoid" turns integer labels into one-hot targets; "softmax" applies
  `config.label_smoothing` (default 0).
  """
  if config.loss == "sigmoid":
    if labels.ndim == 1:
      labels = jax.nn.one_hot(labels, logits.shape[-1])
    return nested_sigmoid_xent(logits, labels, weights, mask=mask)
  return nested_softmax_xent(logits, labels, weights, mask=mask,
                             label_smoothing=config.get("label_smoothing", 0.0))


# --- Nested contrastive loss (dual encoders) ---------------------------------
#
# Every size m scores the prefixes image_emb[:, :m], text_emb[:, :m], each
# L2-normalised on its own. Cost: the raw prefix dot products S_m of all sizes
# come from ONE pass over the embedding, a running sum of the per-chunk GEMMs
# between consecutive sizes (d multiply-adds per pair, as one full-size loss;
# the naive loop pays sum(m)); the prefix norms from cumulative sums of
# per-chunk squared norms; cos_m = S_m * ra_m[:, None] * rb_m[None, :]. One
# hand-written VJP covers the GEMMs and the per-size losses: it keeps S_m (one
# [b, B] per size, no stacked copy) and the log-sum-exps, recomputes the
# softmaxes in the backward, builds the chunk gradients G_j = sum_{i >= j} dS_i
# as one reverse running sum, and gets d(ra), d(rb), d(scale) from the row and
# column sums of one product. What is left over one full-size loss is n
# elementwise passes over [b, B] (benchmarks/contrastive_loss.py, README).
#
# Sharding: rows are split over sharding.BATCH_AXES. Each device gathers the
# texts ([B, d], never a B x B matrix) and scores its b image rows against all
# B texts: the image->text rows are local; the text->image columns need each
# column's log-sum-exp over all images, combined across devices from the local
# column max and sum (pmax / psum of [B] per size); each device adds the columns
# of the texts it owns. The gathered texts' gradient returns through the
# transpose of the all-gather (a reduce-scatter).

CONTRASTIVE_KINDS = ("softmax", "sigmoid")
_NORM_EPS = 1e-12  # added to squared norms: a zero prefix gives a zero cosine, not NaN


def _batch_mesh(mesh):
  """The mesh to shard over, or None when the batch axes hold a single device."""
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      return None
  sizes = dict(mesh.shape)
  if any(a not in sizes for a in sharding.BATCH_AXES):
    return None
  if sizes["data"] * sizes["fsdp"] == 1:
    return None
  return mesh


def _prefix_rsqrt_norms(x: jax.Array, chunks) -> jax.Array:
  """1 / |x[:, :m]| for every size, [n, rows], from cumulative per-chunk squared norms."""
  sq = jnp.stack([jnp.sum(jnp.square(x[:, s:e]), axis=-1) for s, e in chunks])
  return jax.lax.rsqrt(jnp.cumsum(sq, axis=0) + _NORM_EPS)


def _row_offset(axes, rows):
  """Global index of this device's first row (0 without sharding)."""
  return 0 if axes is None else jax.lax.axis_index(axes) * rows


def _is_own_pair(offset, shape):
  """[b, B] bool: True at (i, offset + i), the pair of local row i."""
  i = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  j = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
  return j == i + offset


def _replicated_cotangent(axes, partial):
  """The gradient of a value every device shares (scale, bias): the sum of the devices' parts."""
  return partial if axes is None else jax.lax.psum(partial, axes)


def _chunk_scores(chunks, a, t):
  """Raw prefix dot products a[:, :m] t[:, :m]^T of every size: a running sum of chunk GEMMs."""
  scores, running = [], None
  for start, end in chunks:
    partial = a[:, start:end] @ t[:, start:end].T
    running = partial if running is None else running + partial
    scores.append(running)
  return scores


class _Size:
  """One size's logits scale * s * ra_i * rb_j (+ bias) over the local block [b, B]."""

  def __init__(self, s, ra, rb, scale, bias, offset):
    self.s, self.ra, self.rb, self.scale, self.bias, self.offset = s, ra, rb, scale, bias, offset

  def logits(self):
    logits = (self.s * (self.scale * self.ra)[:, None]) * self.rb[None, :]
    return logits if self.bias is None else logits + self.bias

  def own_logits(self):
    """[b]: each local row's own-pair logit, gathered (no pass over the block)."""
    rows = self.s.shape[0]
    own_s = jnp.take_along_axis(self.s, (self.offset + jnp.arange(rows))[:, None], axis=1)[:, 0]
    own_rb = jax.lax.dynamic_slice_in_dim(self.rb, self.offset, rows)
    logits = self.scale * own_s * self.ra * own_rb
    return logits if self.bias is None else logits + self.bias


def _softmax_size_fwd(axes, size):
  """Sum over local rows of (row CE + own column CE) / 2, and the log-sum-exps."""
  logits = size.logits()
  lse_rows = jax.nn.logsumexp(logits, axis=1)
  col_max = jnp.max(logits, axis=0)
  if axes is not None:
    col_max = jax.lax.pmax(col_max, axes)
  col_sum = jnp.sum(jnp.exp(logits - col_max[None, :]), axis=0)
  if axes is not None:
    col_sum = jax.lax.psum(col_sum, axes)
  lse_cols = col_max + jnp.log(col_sum)
  rows = logits.shape[0]
  own_cols = jax.lax.dynamic_slice_in_dim(lse_cols, size.offset, rows)
  total = 0.5 * jnp.sum(lse_rows + own_cols - 2.0 * size.own_logits())
  return total, (lse_rows, lse_cols)


def _softmax_size_dlogits(size, stats, g):
  # d(sum)/d logits = (softmax over the row + softmax over the column) / 2 - [own pair]
  lse_rows, lse_cols = stats
  logits = size.logits()
  soft = 0.5 * (jnp.exp(logits - lse_rows[:, None]) + jnp.exp(logits - lse_cols[None, :]))
  return g * jnp.where(_is_own_pair(size.offset, logits.shape), soft - 1.0, soft)


def _sigmoid_size_fwd(axes, size):
  """Sum over the local rows and all B columns of -log_sigmoid(z * logits)."""
  logits = size.logits()
  signed = jnp.where(_is_own_pair(size.offset, logits.shape), logits, -logits)
  return -jnp.sum(jax.nn.log_sigmoid(signed)), ()


def _sigmoid_size_dlogits(size, stats, g):
  del stats
  logits = size.logits()
  own = _is_own_pair(size.offset, logits.shape)
  # d/d logits of -log_sigmoid(z * logits) = -z * sigmoid(-z * logits): one sigmoid
  sig = jax.nn.sigmoid(jnp.where(own, -logits, logits))
  return g * jnp.where(own, -sig, sig)


_SIZE_FWD = {"softmax": _softmax_size_fwd, "sigmoid": _sigmoid_size_fwd}
_SIZE_DLOGITS = {"softmax": _softmax_size_dlogits, "sigmoid": _sigmoid_size_dlogits}


def _sizes(axes, chunks, scores, ra, rb, scale, bias):
  offset = _row_offset(axes, ra.shape[1])
  return [_Size(s, ra[k], rb[k], scale[k], None if bias is None else bias[k], offset)
          for k, s in enumerate(scores)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _block_sums(axes, kind, chunks, a, t, ra, rb, scale, bias):
  """Per-size loss sums [n] of the local image rows `a` [b, d] against all texts `t` [B, d].

  ra [n, b], rb [n, B]: 1 / prefix norms. The backward recomputes each size's
  logits from its raw scores (saved, one [b, B] per size) and builds the chunk
  gradients G_j = sum_{i >= j} dscores_i as one reverse running sum.
  """
  return _block_sums_fwd(axes, kind, chunks, a, t, ra, rb, scale, bias)[0]


def _block_sums_fwd(axes, kind, chunks, a, t, ra, rb, scale, bias):
  scores = _chunk_scores(chunks, a, t)
  sums, stats = [], []
  for size in _sizes(axes, chunks, scores, ra, rb, scale, bias):
    total, size_stats = _SIZE_FWD[kind](axes, size)
    sums.append(total)
    stats.append(size_stats)
  return jnp.stack(sums), (a, t, scores, ra, rb, scale, bias, stats)


def _block_sums_bwd(axes, kind, chunks, residuals, g):
  a, t, scores, ra, rb, scale, bias, stats = residuals
  sizes = _sizes(axes, chunks, scores, ra, rb, scale, bias)
  n = len(sizes)
  da, dt = [None] * n, [None] * n
  dra, drb, dscale, dbias = [None] * n, [None] * n, [None] * n, [None] * n
  running = None
  for k in reversed(range(n)):
    size = sizes[k]
    dlogits = _SIZE_DLOGITS[kind](size, stats[k], g[k])
    ds = (dlogits * (size.scale * size.ra)[:, None]) * size.rb[None, :]
    # q = ds * s = dlogits * logits (without the bias): its row sums are ra * dra,
    # its column sums rb * drb, its total scale * dscale (ra, rb > 0 by the norm
    # epsilon; scale must be > 0, as exp(t) is).
    q = ds * size.s
    q_rows, q_cols = jnp.sum(q, axis=1), jnp.sum(q, axis=0)
    dra[k], drb[k] = q_rows / size.ra, q_cols / size.rb
    dscale[k] = jnp.sum(q_rows) / size.scale
    if bias is not None:
      dbias[k] = jnp.sum(dlogits)
    running = ds if running is None else running + ds  # G_k, written once
    start, end = chunks[k]
    da[k] = running @ t[:, start:end]
    dt[k] = running.T @ a[:, start:end]
  unused = a.shape[1] - chunks[-1][1]
  if unused:  # features past the largest size get no gradient
    da.append(jnp.zeros((a.shape[0], unused), a.dtype))
    dt.append(jnp.zeros((t.shape[0], unused), t.dtype))
  dscale = _replicated_cotangent(axes, jnp.stack(dscale))
  dbias = None if bias is None else _replicated_cotangent(axes, jnp.stack(dbias))
  return (jnp.concatenate(da, axis=1), jnp.concatenate(dt, axis=1), jnp.stack(dra),
          jnp.stack(drb), dscale, dbias)


_block_sums.defvjp(_block_sums_fwd, _block_sums_bwd)


def _per_size_vector(value, n: int, name: str) -> jax.Array:
  value = jnp.asarray(value, jnp.float32)
  if value.ndim == 0:
    return jnp.broadcast_to(value, (n,))
  if value.shape != (n,):
    raise ValueError(f"{name} has shape {value.shape}: give a scalar or one value per "
                     f"size ({n},).")
  return value


def _local_pair_sums(axes, kind, chunks, image_rows, text_rows, scale, bias):
  """Per-size loss sums of this device's image rows (or all rows when axes is None)."""
  texts = text_rows if axes is None else jax.lax.all_gather(text_rows, axes, tiled=True)
  ra = _prefix_rsqrt_norms(image_rows, chunks)
  rb = _prefix_rsqrt_norms(texts, chunks)
  sums = _block_sums(axes, kind, chunks, image_rows, texts, ra, rb, scale, bias)
  return sums if axes is None else jax.lax.psum(sums, axes)


def nested_contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, dims, weights, *,
                            scale, bias=None, kind: str = "softmax",
                            mesh=None) -> tuple[jax.Array, jax.Array]:
  """(sum_m weights[m] * loss_m, per-size losses [n]) of a dual encoder's pairs.

  image_emb, text_emb: [B, d] raw embeddings, row i of each a pair. For each size
  m the prefixes a_i = image_emb[i, :m], b_j = text_emb[j, :m] are L2-normalised on
  their own and scored as logits_ij = s_m * a_i . b_j (+ bias_m):
    * "softmax": 0.5 * (CE over each image's row + CE over each text's column),
      averaged over the B pairs (CLIP / ALIGN's symmetric InfoNCE). A bias shifts
      every logit of a row or column alike, so it has no effect (accepted, unused).
    * "sigmoid": -(1/B) sum_ij log_sigmoid(z_ij * logits_ij), z = +1 for the B
      pairs and -1 for the other B^2 - B (SigLIP).
  weights: one per size (None or empty: all 1). scale: scalar or [n], > 0 (s_m;
  the model passes exp(t)); bias: None, scalar or [n]. dims may stop short of d.
  Computed in float32.

  mesh: None takes the context mesh (`jax.sharding.get_abstract_mesh()`, set by
  the train step); rows are then sharded over sharding.BATCH_AXES and each device
  scores its rows against the gathered global batch (module comments above).
  """
  if kind not in CONTRASTIVE_KINDS:
    raise ValueError(f"kind={kind!r} is unknown: use one of {CONTRASTIVE_KINDS}.")
  if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
    raise ValueError(f"image_emb {image_emb.shape} and text_emb {text_emb.shape} must both "
                     "be [B, d] with the same shape (row i of each is a pair).")
  batch, d = image_emb.shape
  nesting = Nesting.create(dims, weights, embedding_dim=d)
  n, chunks = nesting.num_sizes, nesting.chunks
  scale = _per_size_vector(scale, n, "scale")
  bias = None if bias is None or kind == "softmax" else _per_size_vector(bias, n, "bias")
  image_emb = image_emb.astype(jnp.float32)
  text_emb = text_emb.astype(jnp.float32)
  mesh = _batch_mesh(mesh)
  if mesh is None:
    sums = _local_pair_sums(None, kind, chunks, image_emb, text_emb, scale, bias)
  else:
    axes = sharding.BATCH_AXES
    rows = P(axes, None)
    body = functools.partial(_local_pair_sums, axes, kind, chunks)
    args = (image_emb, text_emb, scale) + (() if bias is None else (bias,))
    specs = (rows, rows, P()) + (() if bias is None else (P(),))
    fn = body if bias is not None else (lambda i, t, sc: body(i, t, sc, None))
    sums = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P())(*args)
  per_size = sums / batch
  total = jnp.sum(jnp.asarray(nesting.weights, jnp.float32) * per_size)
  return total, per_size


def _local_pair_top1_sums(axes, chunks, image_rows, text_rows):
  texts = text_rows if axes is None else jax.lax.all_gather(text_rows, axes, tiled=True)
  rows = image_rows.shape[0]
  own = jnp.arange(rows) + _row_offset(axes, rows)
  rb = _prefix_rsqrt_norms(texts, chunks)
  # The image's norm scales its whole row, so only the texts' norms change the argmax.
  hits = jnp.stack([jnp.sum(jnp.argmax(s * rb[k][None, :], axis=1) == own).astype(jnp.float32)
                    for k, s in enumerate(_chunk_scores(chunks, image_rows, texts))])
  return hits if axes is None else jax.lax.psum(hits, axes)


def nested_pair_top1(image_emb: jax.Array, text_emb: jax.Array, dims, *,
                     mesh=None) -> jax.Array:
  """Per size [n]: the fraction of images whose own text has the highest cosine in the batch.

  Image -> text over the (global) batch, prefixes normalised per size; ties go to
  the lower text index. No gradient (a training metric). mesh as in
  `nested_contrastive_loss`.
  """
  batch, d = image_emb.shape
  chunks = Nesting.create(dims, embedding_dim=d).chunks
  image_emb = jax.lax.stop_gradient(image_emb.astype(jnp.float32))
  text_emb = jax.lax.stop_gradient(text_emb.astype(jnp.float32))
  mesh = _batch_mesh(mesh)
  if mesh is None:
    hits = _local_pair_top1_sums(None, chunks, image_emb, text_emb)
  else:
    rows = P(sharding.BATCH_AXES, None)
    hits = jax.shard_map(functools.partial(_local_pair_top1_sums, sharding.BATCH_AXES, chunks),
                         mesh=mesh, in_specs=(rows, rows), out_specs=P())(image_emb, text_emb)
  return hits / batch

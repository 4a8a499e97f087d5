"""ResNet encoder: torchvision parameter counts, PyTorch-equal padding, BlurPool, BN modes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from mrl_jax.models import resnet
from mrl_jax.models.resnet import (BasicBlock, Bottleneck, ResNet, blur_3x3, max_pool_3x3_s2,
                                   resnet_embedding_dim)

from float32_tolerance import float32_atol

# torchvision.models.resnetXX(num_classes=1000): parameters incl. the fc head.
TORCHVISION_PARAMS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032,
                      101: 44_549_160, 152: 60_192_808}


def _num_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(tree, nnx.Param)))


@functools.lru_cache(maxsize=None)
def _abstract_cached(depth: int, items: tuple) -> ResNet:
  return nnx.eval_shape(lambda: ResNet(depth, rngs=nnx.Rngs(0), **dict(items)))


def _abstract(depth: int, **kw) -> ResNet:
  """Shapes only: the 152 never gets allocated. Cached: tracing a 152 takes seconds."""
  return _abstract_cached(depth, tuple(sorted(kw.items())))


@pytest.fixture
def fast_init(monkeypatch):
  """Swap the conv initializer for a numpy draw of the same distribution.

  On CPU, XLA compiles `jax.random.normal` once per kernel shape at about a
  second each, which would dominate this file; the real initializer is checked
  on its own in `test_init_matches_torchvision`. BN init stays the real one.
  """
  rng = np.random.default_rng(0)

  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.asarray(rng.normal(size=shape) * np.sqrt(2.0 / (shape[0] * shape[1] * shape[3])),
                       dtype)

  monkeypatch.setattr(resnet, "_KAIMING_FAN_OUT", init)


@nnx.jit(static_argnames="train")
def _forward(model: ResNet, x: jax.Array, train: bool) -> jax.Array:
  """One compile per model config, instead of one per op and shape in eager mode."""
  return model(x, train=train)


def _blocks(model: ResNet):
  for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
    yield from layer


# ---------------------------------------------------------------- structure

@pytest.mark.parametrize("depth", sorted(TORCHVISION_PARAMS))
def test_param_count_matches_torchvision(depth):
  model = _abstract(depth)
  assert model.embedding_dim == resnet_embedding_dim(depth)
  head = nnx.eval_shape(lambda: nnx.Linear(model.embedding_dim, 1000, rngs=nnx.Rngs(0)))
  assert _num_params(model) + _num_params(head) == TORCHVISION_PARAMS[depth]


@pytest.mark.parametrize("depth", [18, 50])
def test_blurpool_adds_no_state(depth):
  """BlurPool is a constant filter: no parameters and no other state either."""
  shapes = lambda m: jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(m))
  assert shapes(_abstract(depth, blurpool=True)) == shapes(_abstract(depth))


@pytest.mark.parametrize("depth,width,dim", [(18, 64, 512), (34, 64, 512), (50, 64, 2048),
                                             (101, 32, 1024), (152, 64, 2048), (18, 8, 64),
                                             (50, 4, 128)])
def test_embedding_dim(depth, width, dim):
  assert resnet_embedding_dim(depth, width) == dim
  if depth <= 50:
    assert _abstract(depth, width=width).embedding_dim == dim


@pytest.mark.parametrize("depth", [0, 20, 200])
def test_bad_depth_names_allowed_depths(depth):
  with pytest.raises(ValueError, match=r"18, 34, 50, 101, 152"):
    ResNet(depth, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"18, 34, 50, 101, 152"):
    resnet_embedding_dim(depth)


def test_torchvision_names_and_no_fc():
  paths = {p for p, _ in nnx.to_flat_state(nnx.state(_abstract(50)))}
  for p in [("conv1", "kernel"), ("bn1", "scale"), ("bn1", "bias"), ("bn1", "mean"),
            ("bn1", "var"), ("layer1", 0, "conv3", "kernel"), ("layer1", 0, "bn3", "scale"),
            ("layer1", 0, "downsample", 0, "kernel"), ("layer1", 0, "downsample", 1, "scale"),
            ("layer3", 5, "conv2", "kernel"), ("layer4", 2, "bn3", "var")]:
    assert p in paths, p
  assert not any(p[0] == "fc" for p in paths)
  assert ("layer1", 1, "downsample", 0, "kernel") not in paths  # identity shortcut
  basic = {p for p, _ in nnx.to_flat_state(nnx.state(_abstract(18)))}
  assert ("layer1", 0, "downsample", 0, "kernel") not in basic  # 64 -> 64, stride 1
  assert ("layer2", 0, "downsample", 0, "kernel") in basic
  assert not any("conv3" in p for p in basic)


def test_every_conv_uses_torch_symmetric_padding_and_no_bias():
  for small in (False, True):
    model = _abstract(50, small_images=small)
    convs = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Conv)]
    assert len(convs) == 53  # 1 stem + 16 blocks * 3 + 4 downsample
    for conv in convs:
      k = conv.kernel_size[0]
      assert conv.padding == ((k // 2, k // 2), (k // 2, k // 2))
      assert conv.bias is None
    assert model.conv1.kernel_size == ((3, 3) if small else (7, 7))


# ---------------------------------------------------------------- padding/shapes

def _shape_of(model: ResNet, method: str, shape) -> tuple[int, ...]:
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(
      lambda s, x: getattr(nnx.merge(graphdef, s), method)(x, train=False),
      state, jax.ShapeDtypeStruct(shape, jnp.float32))
  return out.shape


def _torch_out(size: int, k: int, s: int, p: int) -> int:
  return (size + 2 * p - k) // s + 1


@pytest.mark.parametrize("size", [224, 225, 97])
def test_stem_and_final_map_sizes_follow_torch_formula(size):
  model = _abstract(50)
  conv = _torch_out(size, 7, 2, 3)
  pool = _torch_out(conv, 3, 2, 1)
  graphdef, state = nnx.split(model)
  conv_shape = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).conv1(x), state,
                              jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)).shape
  assert conv_shape == (1, conv, conv, 64)
  assert _shape_of(model, "stem", (1, size, size, 3)) == (1, pool, pool, 64)
  if size == 224:
    assert (conv, pool) == (112, 56)
    assert _shape_of(model, "features", (1, 224, 224, 3)) == (1, 7, 7, 2048)
  assert _shape_of(model, "__call__", (2, size, size, 3)) == (2, 2048)


def test_stem_matches_torch_ops_on_even_input(fast_init):
  """Even sizes are where 'SAME' would pad 2/3 instead of 3/3 and disagree with torch."""
  model = ResNet(18, width=4, rngs=nnx.Rngs(1))
  x = np.random.default_rng(0).normal(size=(2, 12, 12, 3)).astype(np.float32)
  got = np.asarray(model.conv1(jnp.asarray(x)))
  w = torch.from_numpy(np.asarray(model.conv1.kernel[...]).transpose(3, 2, 0, 1).copy()).double()
  want = F.conv2d(torch.from_numpy(x).double().permute(0, 3, 1, 2), w, stride=2, padding=3)
  want = want.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(got, want, rtol=0,
                             atol=float32_atol(np.abs(want).max(), fan_in=7 * 7 * 3))

  y = np.random.default_rng(1).normal(size=(2, 6, 6, 5)).astype(np.float32) - 3.0  # all < 0
  got = np.asarray(max_pool_3x3_s2(jnp.asarray(y)))
  want = F.max_pool2d(torch.from_numpy(y).permute(0, 3, 1, 2), 3, stride=2, padding=1)
  np.testing.assert_array_equal(got, want.permute(0, 2, 3, 1).numpy())


# ---------------------------------------------------------------- full forward vs torch

def _torch_state_dict(model: ResNet) -> dict[str, torch.Tensor]:
  """nnx paths -> torchvision names (what a checkpoint importer inverts)."""
  rename = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
            "var": "running_var"}
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model)):
    value = np.asarray(var[...])
    if path[-1] == "kernel":
      value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    name = ".".join(str(p) for p in path[:-1]) + "." + rename[path[-1]]
    out[name] = torch.from_numpy(value.copy())
  return out


def _torch_blur(x: torch.Tensor) -> torch.Tensor:
  c = x.shape[1]
  filt = torch.tensor([[1., 2., 1.], [2., 4., 2.], [1., 2., 1.]], dtype=x.dtype) / 16.0
  return F.conv2d(x, filt[None, None].repeat(c, 1, 1, 1), padding=1, groups=c)


def _torch_resnet(sd, x, *, bottleneck: bool, small: bool, blurpool: bool):
  """An eval-mode torchvision ResNet forward written with torch.nn.functional."""

  def conv(name, h, stride):
    w = sd[name + ".weight"]
    if blurpool and stride > 1 and w.shape[1] >= 16:
      h = _torch_blur(h)
    return F.conv2d(h, w, stride=stride, padding=w.shape[-1] // 2)

  def bn(name, h):
    return F.batch_norm(h, sd[name + ".running_mean"], sd[name + ".running_var"],
                        sd[name + ".weight"], sd[name + ".bias"], training=False, eps=1e-5)

  h = F.relu(bn("bn1", conv("conv1", x, 1 if small else 2)))
  if not small:
    h = F.max_pool2d(h, 3, stride=2, padding=1)
  for li in range(1, 5):
    b = 0
    while f"layer{li}.{b}.conv1.weight" in sd:
      p = f"layer{li}.{b}"
      stride = 2 if li > 1 and b == 0 else 1
      if bottleneck:
        y = F.relu(bn(p + ".bn1", conv(p + ".conv1", h, 1)))
        y = F.relu(bn(p + ".bn2", conv(p + ".conv2", y, stride)))
        y = bn(p + ".bn3", conv(p + ".conv3", y, 1))
      else:
        y = F.relu(bn(p + ".bn1", conv(p + ".conv1", h, stride)))
        y = bn(p + ".bn2", conv(p + ".conv2", y, 1))
      if p + ".downsample.0.weight" in sd:
        h = bn(p + ".downsample.1", conv(p + ".downsample.0", h, stride))
      h = F.relu(y + h)
      b += 1
  return h.mean(dim=(2, 3))


def _randomize_bn(model: ResNet, seed: int) -> None:
  """Non-trivial eval-mode BN (default stats are mean 0 / var 1, which hides bugs)."""
  rng = np.random.default_rng(seed)
  for _, m in nnx.iter_modules(model):
    if isinstance(m, nnx.BatchNorm):
      n = m.scale.shape[0]
      m.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
      m.bias[...] = jnp.asarray(rng.normal(0, 0.1, n), jnp.float32)
      m.mean[...] = jnp.asarray(rng.normal(0, 0.1, n), jnp.float32)
      m.var[...] = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)


@pytest.mark.parametrize("depth,width,small,blurpool,size", [
    (18, 8, False, False, 32),
    (50, 4, False, False, 30),
    (18, 16, False, True, 32),   # blur before layer2..4 strided convs and downsamples
    (50, 8, True, True, 16),     # blur before bottleneck conv2 (3x3) and downsample
])
def test_eval_forward_matches_torch_functional_reference(fast_init, depth, width, small,
                                                        blurpool, size):
  model = ResNet(depth, width=width, small_images=small, blurpool=blurpool, rngs=nnx.Rngs(2))
  _randomize_bn(model, seed=3)
  x = np.random.default_rng(4).normal(size=(2, size, size, 3)).astype(np.float32)
  got = np.asarray(_forward(model, jnp.asarray(x), False))
  sd = _torch_state_dict(model)
  reference = functools.partial(_torch_resnet, bottleneck=depth >= 50, small=small,
                                blurpool=blurpool)
  with torch.no_grad():
    want = reference({k: v.double() for k, v in sd.items()},
                     torch.from_numpy(x).double().permute(0, 3, 1, 2)).numpy()
    torch32 = reference(sd, torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  assert got.shape == (2, model.embedding_dim)
  # Against float64, within float32's rounding error at the scale of the output
  # (residual sums grow it to ~1e3 here, so small entries carry large absolute
  # errors): any reduction order is fine, a wrong op is not.
  convs = [v for k, v in sd.items() if k.endswith(".weight") and v.ndim == 4]
  atol = float32_atol(np.abs(want).max(), fan_in=max(int(np.prod(w.shape[1:])) for w in convs),
                      depth=len(convs))
  np.testing.assert_allclose(got, want, rtol=0, atol=atol)
  np.testing.assert_allclose(torch32, want, rtol=0, atol=atol)  # Torch's order is within it too.


# ---------------------------------------------------------------- blurpool

def _naive_blur(x: np.ndarray) -> np.ndarray:
  taps = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float64) / 16.0
  b, h, w, c = x.shape
  padded = np.zeros((b, h + 2, w + 2, c))
  padded[:, 1:-1, 1:-1] = x
  out = np.zeros((b, h, w, c))
  for i in range(h):
    for j in range(w):
      for di in range(3):
        for dj in range(3):
          out[:, i, j, :] += taps[di, dj] * padded[:, i + di, j + dj, :]
  return out


def test_blur_matches_naive_loop():
  x = np.random.default_rng(0).normal(size=(2, 7, 6, 5)).astype(np.float32)
  got = blur_3x3(jnp.asarray(x))
  assert got.shape == x.shape and got.dtype == jnp.float32
  want = _naive_blur(x)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0,
                             atol=float32_atol(np.abs(want).max(), fan_in=9))
  # A constant image stays constant away from the zero-padded border.
  ones = np.asarray(blur_3x3(jnp.ones((1, 5, 5, 2))))
  np.testing.assert_allclose(ones[:, 1:-1, 1:-1], 1.0, rtol=1e-6)
  assert blur_3x3(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16


def test_blurpool_follows_ffcv_rule():
  """Blur only before convs with stride > 1 and >= 16 input channels."""
  model = _abstract(18, width=8, blurpool=True)  # layer2 sees 8 channels: no blur
  assert not model.blur_stem
  assert not model.layer2[0].blur1 and not model.layer2[0].blur_downsample
  assert model.layer3[0].blur1 and model.layer3[0].blur_downsample
  assert not model.layer3[1].blur1
  big = _abstract(50, blurpool=True)
  assert not big.blur_stem  # 3 input channels
  assert not big.layer1[0].blur2 and not big.layer1[0].blur_downsample  # stride 1
  for layer in (big.layer2, big.layer3, big.layer4):
    assert layer[0].blur2 and layer[0].blur_downsample
    assert not any(b.blur2 for b in layer[1:])
  plain = _abstract(50)
  assert not any(b.blur2 or b.blur_downsample for b in _blocks(plain))


# ---------------------------------------------------------------- behaviour

@pytest.mark.parametrize("small,size", [(True, 16), (False, 32)])
def test_output_shape_and_dtype(fast_init, small, size):
  model = ResNet(18, width=8, small_images=small, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, size, size, 3)), jnp.float32)
  for train in (True, False):
    z = _forward(model, x, train)
    assert z.shape == (3, 64) and z.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(z)))


def test_in_channels():
  model = _abstract(18, in_channels=1, width=8, small_images=True)
  assert model.conv1.kernel.shape == (3, 3, 1, 8)
  assert _shape_of(model, "__call__", (2, 8, 8, 1)) == (2, 64)


def test_bfloat16_compute_float32_params_and_output(fast_init):
  model = ResNet(18, width=8, small_images=True, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(nnx.state(model)))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  graphdef, state = nnx.split(model)
  feats = jax.eval_shape(lambda s, v: nnx.merge(graphdef, s).features(v, train=False), state, x)
  assert feats.dtype == jnp.bfloat16
  z = _forward(model, x, False)
  assert z.shape == (2, 64) and z.dtype == jnp.float32
  # Same weights with float32 compute: bf16 keeps ~3 significant digits.
  ref = ResNet(18, width=8, small_images=True, rngs=nnx.Rngs(0))
  nnx.update(ref, nnx.state(model))
  want = np.asarray(_forward(ref, x, False))
  np.testing.assert_allclose(np.asarray(z), want, rtol=0.05, atol=0.05 * np.abs(want).max())


def test_param_dtype():
  model = _abstract(18, width=8, param_dtype=jnp.bfloat16)
  assert {a.dtype for a in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("bfloat16")}


def _stats(model):
  return [np.asarray(a).copy() for a in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]


def test_train_updates_batch_stats_eval_does_not(fast_init):
  model = ResNet(18, width=8, small_images=True, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(1.0, 2.0, size=(4, 8, 8, 3)), jnp.float32)
  before = _stats(model)
  z_eval = _forward(model, x, False)
  assert all(np.array_equal(a, b) for a, b in zip(before, _stats(model)))
  z_train = _forward(model, x, True)
  after = _stats(model)
  assert all(not np.array_equal(a, b) for a, b in zip(before, after))  # every BN moved
  # Momentum 0.9 (torch 0.1): the stem BN's running mean moves 10% of the way.
  stem_out = np.asarray(model.conv1(x))
  # The jitted model and this eager conv may sum in other orders: a conv, then the mean.
  np.testing.assert_allclose(
      np.asarray(model.bn1.mean[...]), 0.1 * stem_out.mean((0, 1, 2), dtype=np.float64), rtol=0,
      atol=float32_atol(0.1 * np.abs(stem_out).max(), fan_in=stem_out[..., 0].size, depth=2))
  assert model.bn1.epsilon == 1e-5 and model.bn1.momentum == 0.9
  # Train mode normalises with batch stats, so it differs from eval mode.
  assert not np.allclose(np.asarray(z_train), np.asarray(z_eval))


def test_conv_init_is_kaiming_fan_out_normal():
  """torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu"), untruncated."""
  conv = resnet._conv(64, 64, 3, 1, dtype=jnp.float32, param_dtype=jnp.float32,
                      rngs=nnx.Rngs(0))
  k = np.asarray(conv.kernel[...])
  std = np.sqrt(2.0 / (9 * 64))
  np.testing.assert_allclose(k.std(), std, rtol=0.05)
  assert np.abs(k).max() > 2.5 * std  # a truncated normal would stop at 2 std


def test_bn_init_matches_torchvision(fast_init):
  model = ResNet(18, width=8, rngs=nnx.Rngs(0))
  for _, m in nnx.iter_modules(model):
    if isinstance(m, nnx.BatchNorm):
      assert np.all(np.asarray(m.scale[...]) == 1) and np.all(np.asarray(m.bias[...]) == 0)
      assert np.all(np.asarray(m.mean[...]) == 0) and np.all(np.asarray(m.var[...]) == 1)


@pytest.mark.parametrize("depth,width", [(18, 8), (50, 4)])
def test_zero_init_residual_makes_blocks_identity(fast_init, depth, width):
  model = ResNet(depth, width=width, zero_init_residual=True, rngs=nnx.Rngs(0))
  last = "bn3" if depth >= 50 else "bn2"
  for block in _blocks(model):
    assert np.all(np.asarray(getattr(block, last).scale[...]) == 0)
    assert np.all(np.asarray(block.bn1.scale[...]) == 1)
  # A block without projection returns relu(x) == x for x >= 0, in both modes.
  block = model.layer1[1]
  assert block.downsample is None
  c = block.conv1.in_features
  x = jnp.asarray(np.abs(np.random.default_rng(0).normal(size=(2, 4, 4, c))), jnp.float32)
  for train in (False, True):
    np.testing.assert_allclose(np.asarray(block(x, train=train)), np.asarray(x), atol=1e-6)
  plain = ResNet(depth, width=width, rngs=nnx.Rngs(0))
  assert np.all(np.asarray(getattr(plain.layer1[1], last).scale[...]) == 1)


def test_blocks_are_importable_types():
  assert isinstance(_abstract(18).layer1[0], BasicBlock)
  assert isinstance(_abstract(50).layer1[0], Bottleneck)

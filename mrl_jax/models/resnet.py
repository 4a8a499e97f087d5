"""ResNet encoders (depths 18/34/50/101/152) in Flax NNX, without a classifier.

The architecture follows torchvision's ResNet v1.5 (a bottleneck block strides
in its 3x3 conv, not its first 1x1), in NHWC layout with HWIO kernels. The
output is the global-average-pooled feature vector; the nested MRL head that
scores it lives in `nested_head.py`.

Attribute names mirror torchvision so a PyTorch state dict maps 1:1:

    torchvision                       here (nnx.state path)
    conv1.weight                      conv1/kernel
    bn1.{weight,bias}                 bn1/{scale,bias}
    bn1.running_{mean,var}            bn1/{mean,var}
    layer2.0.conv2.weight             layer2/0/conv2/kernel
    layer2.0.downsample.0.weight      layer2/0/downsample/0/kernel
    layer2.0.downsample.1.weight      layer2/0/downsample/1/scale

(torch conv weights are OIHW: transpose with (2, 3, 1, 0) to get HWIO.)

All padding is PyTorch's explicit symmetric padding (k // 2 on every side),
never 'SAME': for stride 2, 'SAME' puts the extra pad row at the bottom/right
only, which shifts the sampling grid and changes the numbers.

BlurPool (the FFCV recipe used to train the official MRL checkpoints) blurs
the input of every conv that has stride > 1 and at least 16 input channels.
FFCV stores the filter as a buffer (`...conv2.blur_filter`) and moves the conv
to `...conv2.conv.weight`; an importer drops the former and strips the extra
`.conv`. Here the filter is a constant, so BlurPool adds no state at all.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# depth -> (block kind, number of blocks in layer1..layer4)
_LAYOUTS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
_EXPANSION = {"basic": 1, "bottleneck": 4}

# torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu"): an
# plain (untruncated) normal with std sqrt(2 / (k*k*out_channels)). In jax,
# "normal" is untruncated; "truncated_normal" would clip at 2 std.
_KAIMING_FAN_OUT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

_BLUR_TAPS = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0


def _layout(depth: int) -> tuple[str, tuple[int, int, int, int]]:
  if depth not in _LAYOUTS:
    raise ValueError(f"ResNet depth must be one of {sorted(_LAYOUTS)}, got {depth!r}.")
  return _LAYOUTS[depth]


def resnet_embedding_dim(depth: int, width: int = 64) -> int:
  """Size of the pooled feature vector: 8*width (18/34) or 32*width (50+)."""
  kind, _ = _layout(depth)
  return 8 * width * _EXPANSION[kind]


def blur_3x3(x: jax.Array) -> jax.Array:
  """Per-channel [[1,2,1],[2,4,2],[1,2,1]]/16 blur of NHWC `x`, stride 1, zero pad 1.

  The filter is rebuilt as a constant on every call (XLA folds it), so it is
  not model state and a checkpoint holds nothing for it.
  """
  channels = x.shape[-1]
  # Depthwise conv: HWIO kernel with I = 1 and one output per input channel.
  kernel = jnp.broadcast_to(jnp.asarray(_BLUR_TAPS, dtype=x.dtype)[:, :, None, None],
                            (3, 3, 1, channels))
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding=((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch's MaxPool2d(3, stride=2, padding=1): pads with -inf, so the pad never wins."""
  # A Python-scalar init value keeps JAX's differentiable max-pool path.
  return jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max,
      window_dimensions=(1, 3, 3, 1), window_strides=(1, 2, 2, 1),
      padding=((0, 0), (1, 1), (1, 1), (0, 0)))


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int, *, dtype: Any,
          param_dtype: Any, rngs: nnx.Rngs) -> nnx.Conv:
  pad = kernel // 2
  return nnx.Conv(in_ch, out_ch, (kernel, kernel), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), use_bias=False,
                  kernel_init=_KAIMING_FAN_OUT, dtype=dtype, param_dtype=param_dtype,
                  rngs=rngs)


def _bn(channels: int, *, zero_scale: bool = False, dtype: Any, param_dtype: Any,
        rngs: nnx.Rngs) -> nnx.BatchNorm:
  # Flax momentum is the weight of the *old* running value: 0.9 == torch's 0.1.
  return nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, dtype=dtype,
                       param_dtype=param_dtype,
                       scale_init=nnx.initializers.zeros if zero_scale else nnx.initializers.ones,
                       bias_init=nnx.initializers.zeros, rngs=rngs)


def _blurs(blurpool: bool, conv: nnx.Conv) -> bool:
  """FFCV's rule: blur before convs that downsample and see >= 16 channels."""
  return blurpool and max(conv.strides) > 1 and conv.in_features >= 16


def _apply_conv(conv: nnx.Conv, x: jax.Array, blur: bool) -> jax.Array:
  return conv(blur_3x3(x) if blur else x)


class _Block(nnx.Module):
  """Shared parts of both block kinds: the optional projection shortcut."""

  def _init_downsample(self, in_ch: int, out_ch: int, stride: int, blurpool: bool,
                       dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> None:
    if stride != 1 or in_ch != out_ch:
      # A list, so paths read `downsample/0` (conv) and `downsample/1` (bn)
      # exactly like torchvision's nn.Sequential.
      self.downsample = nnx.List([
          _conv(in_ch, out_ch, 1, stride, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
          _bn(out_ch, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
      ])
      self.blur_downsample = _blurs(blurpool, self.downsample[0])
    else:
      self.downsample = None
      self.blur_downsample = False

  def _shortcut(self, x: jax.Array, train: bool) -> jax.Array:
    if self.downsample is None:
      return x
    conv, bn = self.downsample
    return bn(_apply_conv(conv, x, self.blur_downsample), use_running_average=not train)


class BasicBlock(_Block):
  """Two 3x3 convs (ResNet-18/34); the first one strides."""

  expansion = 1

  def __init__(self, in_ch: int, planes: int, stride: int = 1, *, blurpool: bool = False,
               zero_init_residual: bool = False, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = _conv(in_ch, planes, 3, stride, **kw)
    self.bn1 = _bn(planes, **kw)
    self.conv2 = _conv(planes, planes, 3, 1, **kw)
    self.bn2 = _bn(planes, zero_scale=zero_init_residual, **kw)
    self.blur1 = _blurs(blurpool, self.conv1)
    self._init_downsample(in_ch, planes, stride, blurpool, dtype, param_dtype, rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    ura = not train
    y = nnx.relu(self.bn1(_apply_conv(self.conv1, x, self.blur1), use_running_average=ura))
    y = self.bn2(self.conv2(y), use_running_average=ura)
    return nnx.relu(y + self._shortcut(x, train))


class Bottleneck(_Block):
  """1x1 reduce, 3x3 (strides: ResNet v1.5), 1x1 expand by 4 (ResNet-50+)."""

  expansion = 4

  def __init__(self, in_ch: int, planes: int, stride: int = 1, *, blurpool: bool = False,
               zero_init_residual: bool = False, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    out_ch = planes * self.expansion
    self.conv1 = _conv(in_ch, planes, 1, 1, **kw)
    self.bn1 = _bn(planes, **kw)
    self.conv2 = _conv(planes, planes, 3, stride, **kw)
    self.bn2 = _bn(planes, **kw)
    self.conv3 = _conv(planes, out_ch, 1, 1, **kw)
    self.bn3 = _bn(out_ch, zero_scale=zero_init_residual, **kw)
    self.blur2 = _blurs(blurpool, self.conv2)
    self._init_downsample(in_ch, out_ch, stride, blurpool, dtype, param_dtype, rngs)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    ura = not train
    y = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
    y = nnx.relu(self.bn2(_apply_conv(self.conv2, y, self.blur2), use_running_average=ura))
    y = self.bn3(self.conv3(y), use_running_average=ura)
    return nnx.relu(y + self._shortcut(x, train))


class ResNet(nnx.Module):
  """ResNet encoder: [B, H, W, C] images -> [B, embedding_dim] float32 features.

  Args:
    depth: 18, 34, 50, 101 or 152.
    in_channels: channels of the input images.
    width: channels of the stem; every stage scales with it (64 = torchvision).
    small_images: CIFAR-style stem (3x3 stride-1 conv, no max-pool) for
      8x8..32x32 inputs, where the usual /4 stem would leave too little map.
    blurpool: FFCV's anti-aliasing blur before strided convs (no parameters).
    zero_init_residual: zero the scale of each block's last BN, so each
      residual branch starts as the identity (helps large-batch training).
    dtype: compute dtype (e.g. bfloat16); params stay in `param_dtype` and the
      pooled output is always float32.
  """

  def __init__(self, depth: int, *, in_channels: int = 3, width: int = 64,
               small_images: bool = False, blurpool: bool = False,
               zero_init_residual: bool = False, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    kind, counts = _layout(depth)
    if width < 1:
      raise ValueError(f"ResNet width must be a positive integer, got {width!r}.")
    block_cls = BasicBlock if kind == "basic" else Bottleneck
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.depth = depth
    self.small_images = small_images
    self.dtype = dtype
    self.embedding_dim = resnet_embedding_dim(depth, width)

    if small_images:
      self.conv1 = _conv(in_channels, width, 3, 1, **kw)
    else:
      self.conv1 = _conv(in_channels, width, 7, 2, **kw)
    self.bn1 = _bn(width, **kw)
    self.blur_stem = _blurs(blurpool, self.conv1)

    in_ch = width
    for i, n in enumerate(counts):
      planes = width * 2**i
      blocks = []
      for j in range(n):
        stride = 2 if (i > 0 and j == 0) else 1
        blocks.append(block_cls(in_ch, planes, stride, blurpool=blurpool,
                                zero_init_residual=zero_init_residual, **kw))
        in_ch = planes * block_cls.expansion
      # flax 0.12 refuses a plain Python list of modules as an attribute.
      setattr(self, f"layer{i + 1}", nnx.List(blocks))
    assert in_ch == self.embedding_dim

  def stem(self, x: jax.Array, *, train: bool) -> jax.Array:
    """conv1 -> bn1 -> relu (-> 3x3/2 max-pool unless small_images)."""
    x = x.astype(self.dtype)
    x = nnx.relu(self.bn1(_apply_conv(self.conv1, x, self.blur_stem),
                          use_running_average=not train))
    return x if self.small_images else max_pool_3x3_s2(x)

  def features(self, x: jax.Array, *, train: bool) -> jax.Array:
    """The last feature map before pooling: [B, H/32, W/32, embedding_dim] (H/8 if small)."""
    x = self.stem(x, train=train)
    for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in layer:
        x = block(x, train=train)
    return x

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """[B, H, W, C] -> [B, embedding_dim] float32 (global average pool)."""
    # Pool in float32: a bf16 mean over 49+ positions loses digits for nothing.
    return jnp.mean(self.features(x, train=train).astype(jnp.float32), axis=(1, 2))

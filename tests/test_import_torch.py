"""Importing official MRL ResNet-50 PyTorch state dicts: restored logits equal PyTorch's.

A torchvision-compatible ResNet-50 (and FFCV's BlurPool wrapper) is written
here in plain torch, so the test needs neither torchvision nor FFCV. One random
backbone is shared by all cases; each case adds a head layout, saves the state
dict with `torch.save`, imports it, restores the workdir with `inference.load`
(config.json, the latest checkpoint, the meta check) and compares every nested
logit with the PyTorch model in eval mode, at float32's rounding error.
"""

import copy
import os
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mrl_jax import inference
from mrl_jax.errors import ConfigError
from mrl_jax.tools import import_torch
from mrl_jax.tools.import_torch import StateDictError

from conftest import subprocess_env
from float32_tolerance import float32_atol

NUM_CLASSES = 10
MRL_DIMS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)


# ---------------------------------------------------------------- torch reference model

class Bottleneck(nn.Module):
  """torchvision's v1.5 bottleneck: the 3x3 conv strides."""

  def __init__(self, inplanes, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = downsample

  def forward(self, x):
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50Body(nn.Module):
  """torchvision.models.resnet50 without `fc`: images -> pooled 2048-d features."""

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    inplanes = 64
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
      stride = 1 if i == 0 else 2
      downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                 nn.BatchNorm2d(planes * 4))
      layers = [Bottleneck(inplanes, planes, stride, downsample)]
      inplanes = planes * 4
      layers += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
      setattr(self, f"layer{i + 1}", nn.Sequential(*layers))

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
      x = layer(x)
    return x.mean(dim=(2, 3))


class BlurPoolConv2d(nn.Module):
  """FFCV's wrapper: a fixed depthwise 3x3 blur, then the wrapped conv."""

  def __init__(self, conv):
    super().__init__()
    taps = torch.tensor([[[[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]]]) / 16.0
    self.conv = conv
    self.register_buffer("blur_filter", taps.repeat(conv.in_channels, 1, 1, 1))

  def forward(self, x):
    x = F.conv2d(x, self.blur_filter, stride=1, padding=1, groups=self.conv.in_channels)
    return self.conv(x)


def apply_blurpool(module: nn.Module) -> None:
  """FFCV's rule: wrap convs with stride > 1 and >= 16 input channels."""
  for name, child in module.named_children():
    if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
      setattr(module, name, BlurPoolConv2d(child))
    else:
      apply_blurpool(child)


class MRLHead(nn.Module):
  """The official MRL_Linear_Layer: `nesting_classifier_i` per size (efficient: only 0)."""

  def __init__(self, dims, num_classes, efficient=False):
    super().__init__()
    self.dims, self.efficient = dims, efficient
    for i, m in enumerate(dims[-1:] if efficient else dims):
      setattr(self, f"nesting_classifier_{i}", nn.Linear(m, num_classes))

  def forward(self, z):
    if self.efficient:
      return _efficient_logits(self.nesting_classifier_0, z, self.dims)
    return torch.stack([getattr(self, f"nesting_classifier_{i}")(z[:, :m])
                        for i, m in enumerate(self.dims)])


def _efficient_logits(linear: nn.Linear, z, dims):
  return torch.stack([z[:, :m] @ linear.weight[:, :m].T + linear.bias for m in dims])


class PlainEfficientHead(nn.Linear):
  """MRL-E saved as a plain `fc.weight` [C, 2048]."""

  def forward(self, z):
    return _efficient_logits(self, z, MRL_DIMS)


class FixedFeatureHead(nn.Linear):
  """FF-k: a plain classifier on z[:, :k]."""

  def forward(self, z):
    return super().forward(z[:, :self.in_features])[None]


@pytest.fixture(scope="module")
def body():
  """A random ResNet-50 with realistic, then perturbed, BN statistics and affine params."""
  torch.manual_seed(0)
  model = ResNet50Body()
  bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  for bn in bns:  # one train-mode pass sets running stats to that batch's statistics
    bn.momentum = 1.0
  with torch.no_grad():
    model.train()(torch.randn(4, 3, 64, 64))
    gen = torch.Generator().manual_seed(1)
    for bn in bns:
      n = bn.num_features
      bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
      bn.bias.copy_(0.1 * torch.randn(n, generator=gen))
      bn.running_mean.add_(0.1 * torch.randn(n, generator=gen) * bn.running_var.sqrt())
      bn.running_var.mul_(torch.rand(n, generator=gen) * 0.4 + 0.8)
      bn.momentum = 0.1
  return model.eval()


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(2).normal(size=(2, 64, 64, 3)).astype(np.float32)  # NHWC


def _state_dict(body: nn.Module, head: nn.Module, *, prefix: str = "") -> dict:
  sd = dict(body.state_dict())
  sd.update({"fc." + k: v for k, v in head.state_dict().items()})
  return {prefix + k: v for k, v in sd.items()}


def _torch_logits(body, head, images) -> np.ndarray:
  with torch.no_grad():
    return head.eval()(body.eval()(torch.from_numpy(images).permute(0, 3, 1, 2))).numpy()


# ---------------------------------------------------------------- JAX side: restore like inference

def _restore_and_run(workdir: str, images: np.ndarray) -> tuple[ml_collections.ConfigDict,
                                                                np.ndarray]:
  """The workdir as users get it: `inference.load`, with the config.json the import wrote."""
  model = inference.load(workdir)
  assert model.step == import_torch.IMPORT_STEP
  # The ImageNet recipe trains in bfloat16; an import computes what PyTorch did.
  assert model.config.compute_dtype == "float32"
  with jax.default_matmul_precision("highest"):  # No TF32 where a GPU runs the tests.
    logits = model.nested_logits(images)
  return model.config, logits


def _assert_close(got, want):
  """Equal up to float32 rounding: longest sum a 3x3x512 conv, 53 convs and the head in sequence."""
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=float32_atol(np.abs(want).max(),
                                                                  fan_in=3 * 3 * 512, depth=54))


def _save(tmp_path, sd) -> str:
  path = str(tmp_path / "model.pt")
  torch.save(sd, path)
  return path


# ---------------------------------------------------------------- end to end

def test_mrl_ddp_prefix_no_blurpool(body, images, tmp_path):
  torch.manual_seed(3)
  head = MRLHead(MRL_DIMS, NUM_CLASSES)
  sd = _state_dict(body, head, prefix="module.")
  assert "module.layer1.0.bn1.num_batches_tracked" in sd
  workdir = str(tmp_path / "w")
  path = import_torch.import_state_dict(import_torch.load_torch_checkpoint(_save(tmp_path, sd)),
                                        workdir)
  assert path == os.path.join(workdir, "checkpoints", "0") and os.path.isdir(path)
  config, got = _restore_and_run(workdir, images)
  assert config.head == "mrl" and not config.model.blurpool
  assert tuple(config.nesting.dims) == MRL_DIMS
  _assert_close(got, _torch_logits(body, head, images))
  with pytest.raises(FileExistsError, match="new --workdir"):
    import_torch.import_state_dict(sd, workdir)


def test_mrl_e_plain_fc_with_blurpool(body, images, tmp_path):
  blurred = copy.deepcopy(body)
  apply_blurpool(blurred)
  torch.manual_seed(4)
  head = PlainEfficientHead(2048, NUM_CLASSES)
  sd = _state_dict(blurred, head)
  assert "layer2.0.conv2.conv.weight" in sd and "layer4.0.downsample.0.blur_filter" in sd
  assert "conv1.conv.weight" not in sd  # the stem sees 3 channels: never blurred
  workdir = str(tmp_path / "w")
  import_torch.import_state_dict(torch.load(_save(tmp_path, sd)), workdir, num_classes=NUM_CLASSES)
  config, got = _restore_and_run(workdir, images)
  assert config.head == "mrl_e" and config.model.blurpool
  want = _torch_logits(blurred, head, images)
  _assert_close(got, want)
  # BlurPool changes the numbers: importing it without the blur would be caught.
  assert not np.allclose(want, _torch_logits(body, head, images), rtol=1e-2)


def test_mrl_e_nesting_classifier_0(body, images, tmp_path):
  torch.manual_seed(5)
  head = MRLHead(MRL_DIMS, NUM_CLASSES, efficient=True)
  sd = _state_dict(body, head)
  assert "fc.nesting_classifier_0.weight" in sd and "fc.nesting_classifier_1.weight" not in sd
  workdir = str(tmp_path / "w")
  import_torch.import_state_dict(sd, workdir, efficient=True)
  config, got = _restore_and_run(workdir, images)
  assert config.head == "mrl_e"
  _assert_close(got, _torch_logits(body, head, images))


def test_ff_k_via_cli(body, images, tmp_path, capsys):
  torch.manual_seed(6)
  head = FixedFeatureHead(64, NUM_CLASSES)
  checkpoint = _save(tmp_path, _state_dict(body, head))
  workdir = str(tmp_path / "w")
  # Without --ff the narrow plain fc is refused with the flag to use.
  assert import_torch.main(["--checkpoint", checkpoint, "--workdir", workdir]) == 1
  assert "--ff 64" in capsys.readouterr().err
  assert import_torch.main(["--checkpoint", checkpoint, "--workdir", workdir, "--ff", "64"]) == 0
  config, got = _restore_and_run(workdir, images)
  assert config.head == "ff" and config.ff_dim == 64
  assert got.shape == (1, 2, NUM_CLASSES)
  _assert_close(got, _torch_logits(body, head, images))


def test_missing_and_unknown_keys_are_listed_together(body, tmp_path):
  sd = _state_dict(body, MRLHead(MRL_DIMS, NUM_CLASSES))
  del sd["layer3.2.bn2.running_var"]
  del sd["layer2.0.downsample.0.weight"]
  sd["layer5.0.conv1.weight"] = torch.zeros(8, 8, 1, 1)
  with pytest.raises(StateDictError) as err:
    import_torch.import_state_dict(sd, str(tmp_path / "w"))
  msg = str(err.value)
  for key in ("layer3.2.bn2.running_var", "layer2.0.downsample.0.weight",
              "layer5.0.conv1.weight"):
    assert key in msg
  assert "missing keys" in msg and "unknown keys" in msg
  assert not os.path.exists(tmp_path / "w" / "config.json")


def test_compute_dtype_is_float32_unless_asked():
  layout = import_torch.detect_layout(_fc(fc__weight=(5, 2048), fc__bias=(5,)), set())
  assert import_torch.import_config(layout).compute_dtype == "float32"
  assert import_torch.import_config(layout, "bfloat16").compute_dtype == "bfloat16"
  with pytest.raises(ConfigError, match="compute_dtype='float16'"):
    import_torch.import_config(layout, "float16")
  with pytest.raises(SystemExit):
    import_torch.main(["--checkpoint", "m.pt", "--workdir", "w", "--compute_dtype", "float16"])


# Runs the CLI as `python -m` would, with torch made absent: every import of it
# fails as for a module that is not installed, whatever site-packages holds.
_WITHOUT_TORCH = textwrap.dedent("""
    import importlib.abc, runpy, sys

    class NoTorch(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
          raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

    sys.meta_path.insert(0, NoTorch())
    try:
      import torch
    except ModuleNotFoundError:
      pass
    else:
      raise SystemExit("torch is still importable")
    sys.argv = ["import_torch", *sys.argv[1:]]
    runpy.run_module("mrl_jax.tools.import_torch", run_name="__main__", alter_sys=True)
""")


def test_cli_without_torch_says_what_to_install(tmp_path):
  checkpoint = tmp_path / "model.pt"
  checkpoint.write_bytes(b"not read")
  done = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, "--checkpoint", str(checkpoint),
                         "--workdir", str(tmp_path / "w")],
                        env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert done.returncode == 2, done.stdout + done.stderr
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
  assert lines[0].startswith("error: ") and "pip install torch==2.13.0" in lines[0]
  assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------- layout detection (no model)

def _fc(**shapes):
  return {k.replace("__", "."): np.zeros(s, np.float32) for k, s in shapes.items()}


def test_detects_head_layouts():
  mrl = {}
  for i, m in enumerate(MRL_DIMS):
    mrl.update(_fc(**{f"fc__nesting_classifier_{i}__weight": (7, m),
                      f"fc__nesting_classifier_{i}__bias": (7,)}))
  layout = import_torch.detect_layout(mrl, set())
  assert (layout.head, layout.dims, layout.num_classes, layout.blurpool) == ("mrl", MRL_DIMS, 7,
                                                                             False)
  plain = _fc(fc__weight=(5, 2048), fc__bias=(5,))
  assert import_torch.detect_layout(plain, {"layer2.0.conv2"}).head == "mrl_e"
  assert import_torch.detect_layout(plain, set(), efficient=True).blurpool is False
  ff = import_torch.detect_layout(_fc(fc__weight=(5, 32), fc__bias=(5,)), set(), ff_dim=32)
  assert (ff.head, ff.dims) == ("ff", (32,))
  assert not import_torch.detect_layout(_fc(fc__weight=(5, 2048)), set()).head_bias


@pytest.mark.parametrize("tensors,kw,match", [
    (_fc(fc__weight=(5, 512), fc__bias=(5,)), {}, r"pass --ff 512"),
    (_fc(fc__weight=(5, 512), fc__bias=(5,)), {"efficient": True}, r"--efficient but"),
    (_fc(fc__weight=(5, 512), fc__bias=(5,)), {"ff_dim": 64}, r"--ff 64 but"),
    (_fc(fc__weight=(5, 2048), fc__bias=(5,)), {"num_classes": 1000}, r"1000 but .* 5 classes"),
    (_fc(fc__nesting_classifier_0__weight=(5, 8), fc__nesting_classifier_1__weight=(5, 16)),
     {"efficient": True}, r"drop the flag"),
    (_fc(fc__nesting_classifier_0__weight=(5, 8), fc__nesting_classifier_0__bias=(5,),
         fc__nesting_classifier_1__weight=(5, 16)), {}, r"Missing head keys: "
                                                        r"fc\.nesting_classifier_1\.bias"),
    (_fc(fc__weight=(5, 2048), fc__nesting_classifier_0__weight=(5, 2048)), {}, r"both"),
    (_fc(fc__proj__weight=(5, 2048)), {}, r"Unknown head keys: fc\.proj\.weight"),
    (_fc(layer1__0__conv1__weight=(64, 64, 1, 1)), {}, r"no classifier head"),
])
def test_head_errors_are_clear(tensors, kw, match):
  with pytest.raises(StateDictError, match=match):
    import_torch.detect_layout(tensors, set(), **kw)


def test_wrong_blur_filter_is_refused():
  sd = {"module.layer2.0.conv2.conv.weight": torch.zeros(128, 128, 3, 3),
        "module.layer2.0.conv2.blur_filter": torch.ones(128, 1, 3, 3) / 9.0}
  with pytest.raises(StateDictError, match=r"layer2\.0\.conv2\.blur_filter"):
    import_torch.clean_state_dict(sd)
  sd["module.layer2.0.conv2.blur_filter"] = BlurPoolConv2d(nn.Conv2d(128, 128, 3)).blur_filter
  tensors, blurred = import_torch.clean_state_dict(sd)
  assert set(tensors) == {"layer2.0.conv2.weight"} and blurred == {"layer2.0.conv2"}

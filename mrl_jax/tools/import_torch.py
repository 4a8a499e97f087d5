r"""Imports an official RAIVNLab/MRL ResNet-50 PyTorch checkpoint into a workdir.

    python -m mrl_jax.tools.import_torch --checkpoint r50_mrl1_e0_ff2048.pt --workdir W
    python -m mrl_jax.tools.import_torch --checkpoint r50_mrl1_e1_ff2048.pt --workdir W --efficient
    python -m mrl_jax.tools.import_torch --checkpoint r50_mrl0_e0_ff64.pt --workdir W --ff 64

Needs PyTorch to read the `.pt` file (not in requirements.txt):
`pip install torch==2.13.0` (the CPU wheel is enough). Exit status: 0 written,
1 a state dict that does not fit or a non-empty workdir, 2 bad arguments or no
torch installed (said in one line).

The workdir gets what a training run leaves behind for probing and inference:
`W/config.json` (the `configs/resnet50_imagenet.py` recipe with the detected
head, nesting and BlurPool, computing in `--compute_dtype`: float32 by default,
so the restored logits equal PyTorch's up to float32 rounding; the recipe's
bfloat16 is faster on accelerators and differs from PyTorch by about 1e-2
relative) and an Orbax checkpoint at `W/checkpoints/0` whose
meta is the classification task's `checkpoint_meta` for the imported head. It is saved
at step 0: the weights are someone else's, no update has been made here, and
the optimizer state is freshly initialised (SGD momentum zeros). No input
iterator position is saved.

Accepted state-dict layouts (all detected from the keys):
  * torchvision ResNet-50 backbone names, optionally behind a DDP `module.`
    prefix and/or inside a {"state_dict": ...} / {"model": ...} wrapper;
  * FFCV BlurPool: strided convs seeing >= 16 channels stored as
    `<conv>.conv.weight` + `<conv>.blur_filter`; the filter is checked and
    dropped (the JAX model rebuilds it as a constant with `blurpool=True`);
  * heads: MRL `fc.nesting_classifier_{i}.{weight,bias}` (one per size; the
    sizes are read from the weights), MRL-E `fc.weight` [C, 2048] or
    `fc.nesting_classifier_0.weight` [C, 2048], FF-k `fc.weight` [C, k] (needs
    `--ff k`). The number of classes C comes from the head.

Torch -> NNX: conv `weight` [O, I, H, W] -> `kernel` [H, W, I, O]; BN
`weight/bias/running_mean/running_var` -> `scale/bias/mean/var`; a linear
`weight` [C, m] -> [m, C]. Every parameter and BN statistic of the JAX model
must be matched by exactly one tensor of the right shape, otherwise one
`StateDictError` lists all unknown, missing and misshaped keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mrl_jax import experiment, sharding
from mrl_jax.checkpointing import Checkpointer
from mrl_jax.errors import ConfigError, UserError
from mrl_jax.models.resnet import resnet_embedding_dim
from mrl_jax.sharding import path_to_str
from mrl_jax.tasks.classification import ImageDataInfo
from mrl_jax.workdir_path import workdir_path, write_json_atomic

DEPTH = 50
EMBEDDING_DIM = resnet_embedding_dim(DEPTH)  # 2048
IN_CHANNELS = 3
IMPORT_STEP = 0
# Only sizes the LR schedule (irrelevant for inference); ImageNet-1k's train split.
_NUM_TRAIN_EXAMPLES = 1_281_167
_RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "configs", "resnet50_imagenet.py")

_BN_TO_NNX = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_NNX_TO_BN = {v: k for k, v in _BN_TO_NNX.items()}
_BLUR_FILTER = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0
_NESTED_KEY = re.compile(r"fc\.nesting_classifier_(\d+)\.(weight|bias)")
_STRIDED_CONV = re.compile(r"layer[2-9]\.0\.(conv2|downsample\.0)")  # v1.5: the 3x3 strides


TORCH_INSTALL = "pip install torch==2.13.0"
COMPUTE_DTYPES = ("float32", "bfloat16")
DEFAULT_COMPUTE_DTYPE = "float32"


class StateDictError(UserError, ValueError):
  """The state dict does not fit the ResNet-50 + nested head layout."""


class TorchMissingError(UserError, ModuleNotFoundError):
  """PyTorch, needed to read the .pt file, is not installed."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """What a state dict holds, read from its keys and head shapes."""

  head: str                  # "mrl", "mrl_e" or "ff"
  dims: tuple[int, ...]      # the classifier widths (MRL: its nesting; MRL-E: (2048,); FF: (k,))
  num_classes: int
  blurpool: bool
  head_bias: bool
  head_keys: tuple[tuple[str, str | None], ...]  # (weight, bias) torch names per classifier


# ---------------------------------------------------------------- reading

def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor; numpy has no bfloat16, so widen floats
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def clean_state_dict(state_dict: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], set[str]]:
  """Unwraps, strips `module.`, drops BN counters and BlurPool filters.

  Returns (tensors by torchvision name, names of the BlurPool-wrapped convs).
  A wrapped conv's `<conv>.conv.weight` is renamed `<conv>.weight`.
  """
  for wrapper in ("state_dict", "model"):
    if isinstance(state_dict.get(wrapper), Mapping):
      state_dict = state_dict[wrapper]
  raw = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
  blurred, bad_filters = set(), []
  for name, value in raw.items():
    if name.endswith(".blur_filter"):
      conv = name[:-len(".blur_filter")]
      blurred.add(conv)
      filt = _to_numpy(value)
      if filt.ndim != 4 or filt.shape[1:] != (1, 3, 3) or not np.allclose(filt, _BLUR_FILTER):
        bad_filters.append(name)
  if bad_filters:
    raise StateDictError("BlurPool filters that are not FFCV's [[1,2,1],[2,4,2],[1,2,1]]/16 "
                         "depthwise filter (the JAX model cannot use them): "
                         + ", ".join(sorted(bad_filters)))
  tensors = {}
  for name, value in raw.items():
    if name.endswith((".blur_filter", ".num_batches_tracked")):
      continue
    if name.endswith(".conv.weight") and name[:-len(".conv.weight")] in blurred:
      name = name[:-len(".conv.weight")] + ".weight"
    tensors[name] = _to_numpy(value)
  return tensors, blurred


def _conv_stride(name: str) -> int:
  return 2 if name == "conv1" or _STRIDED_CONV.fullmatch(name) else 1


def detect_layout(tensors: Mapping[str, np.ndarray], blurred: set[str], *,
                  efficient: bool | None = None, ff_dim: int | None = None,
                  num_classes: int | None = None) -> Layout:
  """Reads the head kind, sizes and classes from the `fc.*` tensors.

  `efficient=True` asserts an MRL-E head, `ff_dim=k` an FF-k head; they settle
  the plain `fc.weight` case (width 2048 defaults to MRL-E, narrower needs
  `ff_dim`) and are checked against the tensors otherwise.
  """
  if efficient and ff_dim:
    raise StateDictError("Pass either --efficient (MRL-E) or --ff K (fixed-feature), not both.")
  fc = {k: v for k, v in tensors.items() if k.startswith("fc.")}
  nested: dict[int, dict[str, str]] = {}
  unknown = []
  for name in fc:
    m = _NESTED_KEY.fullmatch(name)
    if m:
      nested.setdefault(int(m.group(1)), {})[m.group(2)] = name
    elif name not in ("fc.weight", "fc.bias"):
      unknown.append(name)
  plain = "fc.weight" in fc or "fc.bias" in fc
  if unknown:
    raise StateDictError("Unknown head keys: " + ", ".join(sorted(unknown)) + " (expected "
                         "fc.weight/fc.bias or fc.nesting_classifier_{i}.weight/bias).")
  if plain and nested:
    raise StateDictError("The state dict has both fc.weight/fc.bias and "
                         "fc.nesting_classifier_* keys: only one head layout is allowed.")
  if plain:
    pairs = [{k: "fc." + k for k in ("weight", "bias") if "fc." + k in fc}]
  elif nested:
    if sorted(nested) != list(range(len(nested))):
      raise StateDictError(f"fc.nesting_classifier_i indices {sorted(nested)} are not 0..n-1.")
    pairs = [nested[i] for i in range(len(nested))]
  else:
    raise StateDictError("The state dict has no classifier head (no fc.* keys).")

  missing = [f"{p.get('bias', '?')[:-len('bias')]}weight" for p in pairs if "weight" not in p]
  if missing:
    raise StateDictError("Missing head keys: " + ", ".join(missing))
  with_bias = [("bias" in p) for p in pairs]
  if any(with_bias) and not all(with_bias):
    raise StateDictError("Missing head keys: " + ", ".join(
        p["weight"][:-len("weight")] + "bias" for p, b in zip(pairs, with_bias) if not b))

  weights = [tensors[p["weight"]] for p in pairs]
  if any(w.ndim != 2 for w in weights):
    raise StateDictError("Head weights must be [classes, features] matrices, got "
                         + ", ".join(f"{p['weight']} {w.shape}" for p, w in zip(pairs, weights)))
  classes = {w.shape[0] for w in weights}
  if len(classes) != 1:
    raise StateDictError(f"The head's classifiers disagree on the number of classes: {classes}.")
  (c,) = classes
  if num_classes is not None and num_classes != c:
    raise StateDictError(f"--num_classes={num_classes} but the checkpoint's head has {c} classes.")
  for p in pairs:
    if "bias" in p and tensors[p["bias"]].shape != (c,):
      raise StateDictError(f"{p['bias']} has shape {tensors[p['bias']].shape}, expected ({c},).")
  widths = tuple(int(w.shape[1]) for w in weights)

  if len(pairs) > 1:
    if efficient or ff_dim:
      raise StateDictError(
          f"The checkpoint has {len(pairs)} nesting classifiers (an MRL head, sizes {widths}); "
          "--efficient and --ff describe single-classifier heads: drop the flag.")
    head = "mrl"
  else:
    (width,) = widths
    if ff_dim:
      if width != ff_dim:
        raise StateDictError(f"--ff {ff_dim} but the classifier {pairs[0]['weight']} reads "
                             f"{width} features.")
      head = "ff"
    elif width == EMBEDDING_DIM:
      head = "mrl_e"
    elif efficient:
      raise StateDictError(f"--efficient but the classifier {pairs[0]['weight']} reads {width} "
                           f"features, not the full {EMBEDDING_DIM}.")
    else:
      raise StateDictError(
          f"A single classifier {pairs[0]['weight']} on {width} < {EMBEDDING_DIM} features is "
          f"a fixed-feature (FF-k) head: pass --ff {width}.")
  return Layout(head=head, dims=widths, num_classes=int(c), blurpool=bool(blurred),
                head_bias=all(with_bias),
                head_keys=tuple((p["weight"], p.get("bias")) for p in pairs))


# ---------------------------------------------------------------- config

def _recipe(path: str = _RECIPE) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location("resnet50_imagenet", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def import_config(layout: Layout, compute_dtype: str = DEFAULT_COMPUTE_DTYPE
                  ) -> ml_collections.ConfigDict:
  """The ResNet-50 ImageNet recipe, set to the imported head, sizes and BlurPool.

  `compute_dtype` replaces the recipe's bfloat16 (a training choice): float32
  by default, so the imported model computes what the PyTorch one did.
  """
  if compute_dtype not in COMPUTE_DTYPES:
    raise ConfigError(f"compute_dtype={compute_dtype!r}: use one of {COMPUTE_DTYPES}.")
  config = _recipe()
  config.compute_dtype = compute_dtype
  config.model.depth = DEPTH
  config.model.width = 64
  config.model.blurpool = layout.blurpool
  config.head = layout.head
  if layout.head == "mrl":
    config.nesting.dims = tuple(layout.dims)
    config.nesting.weights = ()
  elif layout.head == "ff":
    config.ff_dim = layout.dims[0]
  if not layout.head_bias:
    config.head_bias = False
  return config


# ---------------------------------------------------------------- mapping

def _torch_name(path: str, layout: Layout) -> str:
  """An NNX path's torchvision name (for error messages about missing tensors)."""
  parts = path.split("/")
  if parts[0] == "head":
    if parts[1] == "kernels":
      return f"fc.nesting_classifier_{parts[2]}.weight"
    return "fc.weight" if parts[1] == "kernel" else "fc.bias (one per classifier)"
  module, leaf = ".".join(parts[1:-1]), parts[-1]
  if leaf == "kernel":
    wrapped = layout.blurpool and _conv_stride(module) > 1 and module != "conv1"
    return module + (".conv.weight" if wrapped else ".weight")
  return f"{module}.{_NNX_TO_BN.get(leaf, leaf)}"


def convert_state_dict(tensors: Mapping[str, np.ndarray], blurred: set[str], layout: Layout,
                       expected: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  """torchvision names -> {NNX path ("encoder/layer1/0/conv1/kernel"): float32 array}.

  `tensors`/`blurred` come from `clean_state_dict`, `expected` maps every NNX
  path of the model's parameters and BN statistics to its shape. Raises one
  StateDictError listing every unknown, missing and misshaped tensor.
  """
  out: dict[str, np.ndarray] = {}
  source: dict[str, str] = {}
  unknown: list[str] = []

  def put(path: str, value: np.ndarray, name: str) -> None:
    if path in out or path not in expected:
      unknown.append(name)
    else:
      out[path], source[path] = np.asarray(value, np.float32), name

  # Head (keys already validated by detect_layout).
  weights = [tensors[w] for w, _ in layout.head_keys]
  biases = [tensors[b] for _, b in layout.head_keys if b is not None]
  head_names = {n for pair in layout.head_keys for n in pair if n is not None}
  if layout.head == "mrl_e":
    put("head/kernel", weights[0].T, layout.head_keys[0][0])
    if biases:
      put("head/bias", biases[0], layout.head_keys[0][1])
  else:
    for i, (w, (name, _)) in enumerate(zip(weights, layout.head_keys)):
      put(f"head/kernels/{i}", w.T, name)
    if biases:
      put("head/bias", np.stack(biases), ", ".join(b for _, b in layout.head_keys))

  # Backbone.
  for name, value in tensors.items():
    if name in head_names:
      continue
    parts = name.split(".")
    module, leaf = parts[:-1], parts[-1]
    is_bn = bool(module) and (re.fullmatch(r"bn\d+", module[-1]) is not None
                              or module[-2:] == ["downsample", "1"])
    if leaf == "weight" and value.ndim == 4:
      put("encoder/" + "/".join(module) + "/kernel", value.transpose(2, 3, 1, 0), name)
    elif is_bn and leaf in _BN_TO_NNX:
      put("encoder/" + "/".join(module) + "/" + _BN_TO_NNX[leaf], value, name)
    else:
      unknown.append(name)

  problems = []
  if unknown:
    problems.append("unknown keys: " + ", ".join(sorted(unknown)))
  missing = sorted(set(expected) - set(out))
  if missing:
    problems.append("missing keys: " + ", ".join(_torch_name(p, layout) for p in missing))
  shapes = [f"{source[p]} gives {out[p].shape} for {p}, which needs {tuple(expected[p])}"
            for p in sorted(out) if out[p].shape != tuple(expected[p])]
  if shapes:
    problems.append("wrong shapes: " + "; ".join(shapes))
  if layout.blurpool:
    convs = {n[:-len(".weight")] for n, v in tensors.items()
             if n.endswith(".weight") and v.ndim == 4 and n not in head_names}
    rule = {n for n in convs if _conv_stride(n) > 1 and tensors[n + ".weight"].shape[1] >= 16}
    if blurred != rule:
      problems.append(
          "BlurPool wraps convs other than FFCV's (stride > 1, >= 16 input channels): "
          f"wrapped but not expected {sorted(blurred - rule)}, expected but not wrapped "
          f"{sorted(rule - blurred)}")
  if problems:
    raise StateDictError(
        f"The state dict is not a torchvision ResNet-{DEPTH} with a {layout.head} head "
        f"({'with' if layout.blurpool else 'without'} BlurPool): " + "; ".join(problems) + ".")
  return out


# ---------------------------------------------------------------- import

def _local_mesh():
  # Arrays are made on one process's devices, unsharded; any mesh restores them later.
  return sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1})


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {path_to_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _fill(abstract: Any, arrays: Mapping[str, np.ndarray]) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(arrays[path_to_str(p)], x.dtype), abstract)


def import_state_dict(state_dict: Mapping[str, Any], workdir: str, *,
                      efficient: bool | None = None, ff_dim: int | None = None,
                      num_classes: int | None = None,
                      compute_dtype: str = DEFAULT_COMPUTE_DTYPE) -> str:
  """Writes `workdir`/config.json and a step-0 checkpoint; returns the checkpoint's path."""
  tensors, blurred = clean_state_dict(state_dict)
  layout = detect_layout(tensors, blurred, efficient=efficient, ff_dim=ff_dim,
                         num_classes=num_classes)
  config = import_config(layout, compute_dtype)
  # The head's classes come from the weights, the schedule's length from ImageNet's size.
  info = ImageDataInfo(layout.num_classes, (config.data.image_size, config.data.image_size,
                                            IN_CHANNELS), False, _NUM_TRAIN_EXAMPLES, "checkpoint")
  exp = experiment.build(config, info=info, mesh=_local_mesh(), check=False)
  ckpt_dir = workdir_path(workdir) / "checkpoints"
  if ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
    raise FileExistsError(f"{ckpt_dir} is not empty: import into a new --workdir.")

  spec = exp.spec
  abstract = spec.abstract
  expected = {**_flat_shapes(abstract["params"]), **_flat_shapes(abstract["model_state"])}
  arrays = convert_state_dict(tensors, blurred, layout, expected)

  # No random init: parameters and statistics are the imported ones, the optimizer
  # state is `tx.init` of them (what `spec.init` would give for these parameters).
  params = _fill(abstract["params"], arrays)
  model_state = _fill(abstract["model_state"], arrays)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": model_state,
           "opt_state": jax.jit(spec.tx.init)(params)}
  if jax.tree.structure(state) != jax.tree.structure(abstract):
    raise AssertionError("The imported state's structure differs from the train state's.")

  checkpointer = Checkpointer(workdir, every_steps=0, keep=1)
  try:
    checkpointer.save(IMPORT_STEP, state, None, exp.checkpoint_meta())
  finally:
    checkpointer.close()
  write_json_atomic(workdir_path(workdir) / "config.json", config.to_dict())
  return os.path.join(checkpointer.directory, str(IMPORT_STEP))


def _import_torch() -> Any:
  try:
    import torch  # pylint: disable=g-import-not-at-top  # only the importer needs torch
  except ImportError as e:
    raise TorchMissingError(
        f"Reading a PyTorch checkpoint needs torch, which is not installed ({e}): "
        f"`{TORCH_INSTALL}` (the CPU wheel is enough), then run this again.") from None
  return torch


def load_torch_checkpoint(path: str) -> Mapping[str, Any]:
  return _import_torch().load(path, map_location="cpu", weights_only=True)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m mrl_jax.tools.import_torch",
      description="Import an official MRL ResNet-50 PyTorch checkpoint into a workdir.")
  parser.add_argument("--checkpoint", required=True, help="the .pt state dict")
  parser.add_argument("--workdir", required=True, help="new workdir to write")
  kind = parser.add_mutually_exclusive_group()
  kind.add_argument("--efficient", action="store_true",
                    help="the head is MRL-E (one shared classifier)")
  kind.add_argument("--ff", type=int, default=None, metavar="K",
                    help="the head is the fixed-feature baseline on the first K dims")
  parser.add_argument("--num_classes", type=int, default=None,
                      help="check the head has this many classes (default: read it)")
  parser.add_argument("--compute_dtype", choices=COMPUTE_DTYPES, default=DEFAULT_COMPUTE_DTYPE,
                      help="written into config.json: float32 (default) computes what PyTorch "
                           "did; bfloat16 is faster on GPU/TPU, ~1e-2 relative off")
  args = parser.parse_args(argv)
  try:
    _import_torch()  # Before anything slow: without torch nothing can be done.
  except TorchMissingError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    path = import_state_dict(load_torch_checkpoint(args.checkpoint), args.workdir,
                             efficient=args.efficient or None, ff_dim=args.ff,
                             num_classes=args.num_classes, compute_dtype=args.compute_dtype)
  except (StateDictError, ConfigError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"Wrote {path} and {os.path.join(args.workdir, 'config.json')}.")
  return 0


if __name__ == "__main__":
  sys.exit(main())

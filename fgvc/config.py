"""The one configuration model for a run.

A run is: which data, which model, how stage 1 trains, how stage 2 adapts, how predictions are made, and the runtime
knobs. YAML recipes and CLI flags are two ways to fill the same :class:`RunConfig`; the resolved config is written
next to every checkpoint (``config.yaml``) so that a run folder alone is enough to resume or reproduce it.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from fgvc.errors import ConfigError

CONFIG_FILE = "config.yaml"
# A run folder's names (fgvc.engine.run_folder describes the layout), here so that torch-free modules read them too.
STAGE1 = "stage1"
STAGE2_PREFIX = "stage2-"  # + the test resolution
LAST, BEST = "last.pt", "best.pt"
FINISHED = "finished.json"  # written last: a cheap "this stage is done" marker with its final metrics


def stage2_dirname(res: int) -> str:
    return f"{STAGE2_PREFIX}{res}"


Tune = Literal["all", "fc", "bn+fc", "bnstats+fc", "stage+bn+fc", "bnstats"]
Augment = Literal["train", "test", "test2"]
TTA = Literal["none", "flip", "tencrop"]
Decode = Literal["cpu", "gpu", "auto"]
CacheFeatures = Literal["auto", "on", "off"]


class _Section(BaseModel):
    # allow_inf_nan: `lr: .inf` passed `gt=0` and trained a stage of NaN weights to "finished"
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML's ``true``/``false`` are not numbers here (pydantic would read ``res: true`` as 1)."""
        if isinstance(value, bool) and cls.model_fields[info.field_name or ""].annotation is not bool:
            raise ValueError(f"expected a value, not the boolean {str(value).lower()}")
        return value


class DataConfig(_Section):
    """Where the images come from and how the validation split is made."""

    dataset: str = "demo"
    root: str | None = None  # None: $FGVC_DATA/<dataset> or datasets/<dataset>
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # hold-out of train where the dataset has no val split
    split_seed: int = 0  # seed of that hold-out: independent of runtime.seed so ensemble members share one val set
    train_on_all: bool = False  # train on train+val (the hold-out is still evaluated, but is no longer unseen)
    workers: int = Field(default_factory=lambda: min(8, os.cpu_count() or 1), ge=0)
    skip_corrupt: bool = False  # skip and count unreadable images instead of failing
    crop_pct: float = Field(0.875, gt=0.0, le=1.0)  # test resize = floor(res / crop_pct)
    decode: Decode = "auto"  # where JPEGs are decoded (gpu: nvjpeg, only on CUDA)

    def resolved_root(self) -> Path:
        """The dataset folder: explicit root, else $FGVC_DATA/<dataset>, else ./datasets/<dataset>."""
        if self.root:
            return Path(self.root).expanduser()
        base = os.environ.get("FGVC_DATA")
        return Path(base).expanduser() / self.dataset if base else Path("datasets") / self.dataset


class ModelConfig(_Section):
    """Architecture and where its starting weights come from."""

    arch: str = "resnet50"
    weights: str | None = "imagenet"  # "imagenet" (local caches only), a file path, or None for random init

    @field_validator("weights")
    @classmethod
    def _none_means_none(cls, value: str | None) -> str | None:
        """``weights: none`` in a recipe means what ``--weights none`` means (random init), not a file called none."""
        return None if value is not None and value.lower() == "none" else value

    def resolved_weights(self) -> str | None:
        """``weights`` with a file path made absolute (from the working directory, as every path of a run): what a
        run folder records, so that it starts from the same file wherever it is run again."""
        if self.weights is None or self.weights == "imagenet":
            return self.weights
        return str(Path(self.weights).expanduser().resolve())


class StageConfig(_Section):
    """One training stage. Stage 1 and stage 2 are the same loop with different values."""

    res: int = Field(448, gt=0)
    epochs: int = Field(30, ge=0)
    batch_size: int = Field(32, gt=0)
    lr: float | None = Field(None, gt=0.0)  # None: lr_base * global batch / 256
    lr_base: float = Field(0.04, gt=0.0)
    opt: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    sched: Literal["cosine", "step", "constant"] = "cosine"
    step_epochs: int = Field(30, gt=0)  # "step": divide the lr by 10 every step_epochs
    warmup_epochs: float = Field(0.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    mixup: float = Field(0.0, ge=0.0)  # Mixup's alpha (timm's Mixup, soft targets); 0: off. Stage 1 only
    cutmix: float = Field(0.0, ge=0.0)  # CutMix's alpha; with mixup too, each batch uses one of the two at random
    # EMA of the weights (timm's ModelEmaV3 with its warm-up), e.g. 0.9998; 0: off. Stage 1 only. Where on, the average
    # is the stage's model: validated, saved as best.pt and read by stage 2 and predict (fgvc.engine.ema)
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)
    grad_accum: int = Field(1, gt=0)
    augment: Augment = "train"
    tune: Tune = "all"
    val_every: int = Field(1, gt=0)

    def resolved_lr(self, world_size: int = 1) -> float:
        """The learning rate, scaled linearly with the global batch when not given explicitly."""
        if self.lr is not None:
            return self.lr
        return self.lr_base * self.batch_size * self.grad_accum * world_size / 256


def default_test_res(train_res: int) -> int:
    """Stage 2's resolution where a recipe or the flags give none: 1.5 x the train resolution, to the nearest multiple
    of 32 (halves up).

    Table 10's SENet-154 448 -> 672 (its ratios: 1.39-1.67); ResNet-50 at 224 gets 352, between the paper's 320 and
    384 (Table 2, section 5.1). `fgvc sweep` measures the best one on the validation split.
    """
    return max(32, int(1.5 * train_res / 32 + 0.5) * 32)


def _stage2_default() -> StageConfig:
    # Paper section 5.3 / appendix E: test-time DA, last BN + classifier, few epochs, small lr. Section 5's fine-tuning
    # lr is "0.008 ... B = 512", the public code's 8e-3 x B / 512: 0.004 per 256 images.
    return StageConfig(res=672, epochs=2, lr_base=0.004, sched="cosine", augment="test", tune="bn+fc")


class PredictConfig(_Section):
    """How probabilities are computed at test time."""

    tta: TTA = "tencrop"
    batch_size: int = Field(32, gt=0)


class RuntimeConfig(_Section):
    """Speed and reproducibility knobs; none of them changes what is computed beyond float rounding."""

    amp: bool = True  # bf16 where supported, fp16 + grad scaler on older GPUs, fp32 on CPU
    channels_last: bool = True
    compile: bool = False
    cuda_graph: bool = True  # prediction replays the forward from a CUDA graph (fgvc.engine.graphs); CUDA only
    # training replays each step's forward and backward from CUDA graphs (GraphedTraining): CUDA, one process,
    # grad_accum 1, not compiled. Off until an H100/H200 run of benchmarks/throughput.py measures it.
    cuda_graph_train: bool = False
    seed: int = 0
    deterministic: bool = False
    device: str | None = None  # None: cuda if available, else cpu
    cache_features: CacheFeatures = "auto"  # stage 2: frozen-trunk output computed once when it fits

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", value):
            raise ValueError(f"'{value}' is not a device; use cpu, cuda, cuda:N or mps")
        return value


class RunConfig(_Section):
    """Everything a run needs. Saved as ``config.yaml`` in the run folder."""

    name: str | None = None  # run folder name; None: <dataset>-<arch>-<res>
    out: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    stage1: StageConfig = Field(default_factory=StageConfig)
    stage2: StageConfig = Field(default_factory=_stage2_default)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @field_validator("name")
    @classmethod
    def _name_stays_under_out(cls, value: str | None) -> str | None:
        """The run's folder under ``out`` (``ablation/lr005`` included): ``../x`` or ``/x`` would train elsewhere."""
        if value is not None and (value.strip() in ("", ".") or Path(value).is_absolute() or ".." in Path(value).parts):
            raise ValueError(f"{value!r} is not a folder under `out` (no '..', not absolute); set `out` for another "
                             "place")  # fmt: skip
        return value

    @field_validator("stage2")
    @classmethod
    def _stage2_does_not_mix(cls, value: StageConfig) -> StageConfig:
        """FixRes' stage 2 fine-tunes on the test-time views; images mixed with others are not what it adapts to.
        Nor does it average weights: its few hundred steps re-estimate the BN statistics at the new resolution, which
        an average would blur with the statistics of the steps before."""
        if value.mixup or value.cutmix:
            raise ValueError("Mixup/CutMix are stage-1 augmentations (stage 2 adapts to the test views): set them "
                             "under stage1, and 0 here")  # fmt: skip
        if value.ema_decay:
            raise ValueError("ema_decay averages stage 1's weights (stage 2 starts from that average): set it under "
                             "stage1, and 0 here")  # fmt: skip
        return value

    @field_validator("stage1")
    @classmethod
    def _an_average_needs_steps(cls, value: StageConfig) -> StageConfig:
        """``bnstats`` takes no optimiser step: the average would stay the starting model and be saved as the result."""
        if value.ema_decay and value.tune == "bnstats":
            raise ValueError("ema_decay averages the weights after each optimiser step, and tune bnstats takes none: "
                             "set ema_decay to 0 or tune to one that learns")  # fmt: skip
        return value

    def run_name(self) -> str:
        if self.name:
            return self.name
        arch = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.model.arch)
        return f"{self.data.dataset}-{arch}-{self.stage1.res}"

    def run_dir(self) -> Path:
        return Path(self.out) / self.run_name()


def _valid_keys(loc: tuple[Any, ...], model: type[BaseModel]) -> list[str]:
    """The keys allowed next to an unknown one (the fields of its section of ``model``)."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return list(model.model_fields)


def first_error(err: ValidationError) -> tuple[str, str]:
    """(dotted key, message) of pydantic's first error, without the "Value error, " our own validators get."""
    first = err.errors()[0]
    return ".".join(str(p) for p in first["loc"]), first["msg"].removeprefix("Value error, ")


def validation_message(
    err: ValidationError,
    source: str,
    extra_keys: tuple[str, ...] = (),
    model: type[BaseModel] | None = None,
    section: str = "",
) -> str:
    """One line for pydantic's first error: the key (under ``section``, e.g. ``ensemble.``) and, for an unknown key,
    the closest valid one and the list of them (the fields of ``model``, RunConfig by default)."""
    key, message = first_error(err)
    key = section + key
    if err.errors()[0]["type"] == "extra_forbidden":
        loc = err.errors()[0]["loc"]
        valid = _valid_keys(loc, model or RunConfig) + (list(extra_keys) if len(loc) == 1 else [])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{source}: unknown key '{key}'{hint}; valid keys there: {', '.join(valid)}"
    return f"{source}: invalid value for '{key}': {message}"


def config_from_dict(values: dict[str, Any], source: str = "config", extra_keys: tuple[str, ...] = ()) -> RunConfig:
    """Build a validated RunConfig; an unknown key or a bad value is a one-line ConfigError naming ``source``.

    ``values`` is merged over the defaults key by key, so a recipe that sets only ``stage2.res`` keeps the other
    stage-2 defaults (test augmentation, bn+fc, small learning rate) rather than a plain StageConfig's.
    ``extra_keys``: the other keys valid at the top level (a recipe's), listed in the unknown-key message.
    Where ``values`` set no ``stage2.res``, it follows ``stage1.res`` (:func:`default_test_res`).
    """
    merged = merge(RunConfig().model_dump(), values, source)
    given = merge({}, values, source).get("stage2")
    train_res = merged["stage1"].get("res") if isinstance(merged.get("stage1"), dict) else None
    unset = isinstance(merged.get("stage2"), dict) and not (isinstance(given, dict) and "res" in given)
    if unset and isinstance(train_res, int) and not isinstance(train_res, bool) and train_res > 0:
        merged["stage2"]["res"] = default_test_res(train_res)
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(validation_message(err, source, extra_keys)) from None


SHIPPED_RECIPES = Path(__file__).parent / "recipes"  # the repository's recipes/, packaged with fgvc


def shipped_recipe(name: str | Path) -> Path | None:
    """The recipe fgvc ships under ``name``, written as in the README (``recipes/cub.yaml``) or bare (``cub``), so the
    README's commands also work from an installed fgvc outside the repository; None for any other path."""
    path = Path(name)
    if len(path.parts) != 1 and path.parent != Path("recipes"):
        return None
    candidate = SHIPPED_RECIPES / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    return candidate if candidate.is_file() else None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for a missing or malformed file. A path that is not there may name a
    shipped recipe (:func:`shipped_recipe`)."""
    path = Path(path)
    if not path.is_file():
        path = shipped_recipe(path) or path
    fgvc_folder = any((path.parent / name).exists() for name in ("stage1", "last.pt", "best.pt", "finished.json"))
    if not path.is_file() and path.name == CONFIG_FILE and fgvc_folder:  # a run's or a stage's own, not a recipe
        raise ConfigError(f"{path}: missing; fgvc saved this folder's settings there: restore it, or retrain with "
                          "--force")  # fmt: skip
    if not path.is_file():
        names = ", ".join(sorted(recipe.stem for recipe in SHIPPED_RECIPES.glob("*.yaml")))
        raise ConfigError(f"{path}: no such recipe/config file; check the path (shipped recipes: {names})")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (YAML recipes are UTF-8 text); check the path") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = f": {text}" if (text := getattr(err, "problem", None)) else ""
        raise ConfigError(f"{path}: not valid YAML{where}{problem}; fix the syntax") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    if not values:  # every default (the demo dataset, 30 epochs of resnet50) is not what an empty file meant
        raise ConfigError(f"{path}: no settings in it; a recipe names at least its dataset (see recipes/*.yaml)")
    if twice := _written_twice(values):
        raise ConfigError(f"{path}: {twice} is set twice, as a dotted key and inside its section; keep one")
    return values


def _written_twice(values: dict[Any, Any]) -> str | None:
    """The first setting a mapping gives twice, once as a dotted key (``stage1.epochs: 3``) and once nested
    (``stage1: {epochs: 5}``): which one won would depend on their order in the file. Each list item (a recipe's
    members) is checked on its own."""
    seen: set[str] = set()
    pending: list[tuple[str, object]] = [(str(k), v) for k, v in values.items()]
    while pending:
        key, value = pending.pop(0)
        if isinstance(value, dict) and value:
            pending += [(f"{key}.{k}", v) for k, v in value.items()]
            continue
        if key in seen:
            return key
        seen.add(key)
        for i, item in enumerate(value if isinstance(value, list) else ()):
            if isinstance(item, dict) and (twice := _written_twice(item)):
                return f"{key}[{i}].{twice}"
    return None


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key written twice in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key '{key}' appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path) -> RunConfig:
    """Load a RunConfig from a YAML file (a recipe or a run folder's ``config.yaml``)."""
    return config_from_dict(read_yaml(path), source=str(path))


def merge(base: dict[str, Any], overrides: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Deep-merge ``overrides`` into a copy of ``base``; keys may be dotted (``stage1.lr``)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in overrides.items():
        if "." in key:
            head, rest = key.split(".", 1)
            section = out.get(head)
            if section is not None and not isinstance(section, dict):
                raise ConfigError(f"{source}: '{head}' is {section!r}, not a mapping of keys; write {head}: {{...}}")
            out[head] = merge(section or {}, {rest: value}, source)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, source)
        else:
            out[key] = value
    return out


def with_overrides(values: dict[str, Any], overrides: dict[str, Any], source: str) -> RunConfig:
    """Defaults <- ``values`` (a recipe's, a saved run's) <- command-line ``overrides``, validated. Overrides may be
    dotted or nested; None values are ignored, so an unset flag keeps the recipe's value."""
    flat = {k: v for k, v in overrides.items() if v is not None}
    return config_from_dict(merge(values, flat, source), source=source)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from fgvc.fileio import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

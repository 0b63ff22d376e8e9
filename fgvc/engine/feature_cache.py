"""Stage-2 feature cache: run the frozen trunk once, train the remaining epochs through the tuned tail only.

In FixRes stage 2 with the deterministic ``test`` augmentation and a policy that tunes only the end of the network
(``fc``, ``bn+fc``, ``bnstats+fc``, ``bnstats``, ``stage+bn+fc``), everything before the first tuned module is frozen
and in eval mode, so its output for an image is the same in every epoch. When those activations fit in memory (CUB:
~6k images), computing them once and running later epochs through the tail alone saves most of the compute.

The model is split at the input of the top-level "chain" element (``nn.Sequential`` containers such as ResNet's
``layer4`` or EfficientNet's ``blocks`` flattened into their blocks) that holds the first tuned module. The trunk is the
model's own forward, stopped by a hook at that input; the tail is the remaining chain elements plus the model's head
glue (timm ``forward_head``, pretrainedmodels ``logits``, else a flatten before a ``Linear``). Both are built from the
model's own modules, so parameters, buffers and train/eval flags are shared. A split is only used after
``tail(trunk(x)) == model(x)`` was checked on an example; models whose forward is not such a chain are refused.

Usage in a stage-2 run (single process)::

    split = split_model(model, tune, example, rt.autocast)  # None: train uncached
    use, why = should_cache(mode, augment, tune, cache_bytes_estimate(split, n, res, split.feature_dtype), budget)
    cache = compute_cache(split.trunk, test_loader, prepare, rt)
    for epoch in ...:
        sampler.set_epoch(epoch, start=...)
        set_train_mode(model, tune)
        stats = train_one_epoch_cached(split.tail, cache, sampler, batch_size, drop_last, optimizer, ...)
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeGuard, cast, get_args

import torch
from torch import nn
from torch.utils.data import DataLoader

from fgvc.config import CacheFeatures
from fgvc.engine.loop import EpochStats, StopFlag, Stopped, train_one_epoch
from fgvc.engine.runtime import Runtime
from fgvc.errors import ConfigError
from fgvc.models import set_train_mode, trainable_parameters, unwrap_model
from fgvc.models.meta import modes_restored
from fgvc.progress import progress_bar

log = logging.getLogger("fgvc")

CACHE_MODES: tuple[str, ...] = get_args(CacheFeatures)
CACHEABLE_AUGMENT = "test"  # the only deterministic stage-2 augmentation
CACHEABLE_TUNES = ("fc", "bn+fc", "bnstats+fc", "stage+bn+fc", "bnstats")  # every policy but "all"
BUDGET_FRACTION = 0.25  # of free accelerator memory (CUDA) or available RAM (CPU)
VERIFY_RTOL = 1e-5  # tail(trunk(x)) vs model(x), relative to the largest |model(x)|

# (features method, head method): the head glue of timm and of Cadene's pretrainedmodels.
_HEAD_APIS = (("forward_features", "forward_head"), ("features", "logits"))


class _Captured(Exception):
    """Raised by the trunk's hook to stop the forward pass once the cut input is in hand."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__("captured")
        self.value = value


class _NotAChain(Exception):
    """Why a model cannot be split; the caller trains uncached."""


# ---------------------------------------------------------------------------------------------------------------------
# Splitting the model


class Trunk:
    """The frozen front of the model: the model's own forward, stopped at the input of the cut module.

    Running the real forward (rather than a list of modules) keeps whatever glue code the model has before the cut.
    """

    def __init__(self, model: nn.Module, cut_module: nn.Module, cut: str) -> None:
        self.model = model
        self.cut_module = cut_module
        self.cut = cut

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        def capture(_module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                raise RuntimeError(f"{self.cut} is not called with a tensor as its first argument")
            raise _Captured(args[0])

        handle = self.cut_module.register_forward_pre_hook(capture)
        try:
            self.model(x)
        except _Captured as captured:
            return captured.value
        finally:
            handle.remove()
        raise RuntimeError(f"the forward pass never reached {self.cut}")


class Tail(nn.Module):
    """The tuned end of the model: the chain elements from the cut on, then the model's head glue.

    Holds the model's own modules (no copies), so training the tail trains the model. Set train/eval modes on the
    full model with :func:`fgvc.models.set_train_mode`, not with ``tail.train()``, which would put every tail module
    in train mode.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        head: Callable[[torch.Tensor], torch.Tensor] | None = None,
        head_modules: Sequence[nn.Module] = (),
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self._head = head  # a bound method of the model, which calls head_modules itself
        # Registered so that the tail's parameters() and buffers() cover everything it runs.
        self.head_modules = nn.ModuleList(head_modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self._head is None and isinstance(block, nn.Linear) and x.dim() > 2:
                x = x.flatten(1)  # the ``x.view(x.size(0), -1)`` of a classic forward
            x = block(x)
        return x if self._head is None else self._head(x)

    def extra_repr(self) -> str:
        return "head=" + (getattr(self._head, "__name__", "?") if self._head is not None else "flatten before Linear")


@dataclass
class Split:
    """A model cut into a frozen trunk and a trainable tail, verified on an example.

    Attributes:
        trunk: ``images -> cut input`` (run it in eval mode without grad, as :func:`compute_cache` does).
        tail: ``cut input -> logits``.
        cut: Name of the module whose input is cached.
        feature_shape: Per-image shape of the trunk output at the example's size.
        example_size: ``(H, W)`` of the example, the reference for :func:`cache_bytes_estimate`.
        feature_dtype: What the trunk outputs under the run's precision, and so what the cache holds: the AMP dtype
            for a CNN's convolutions, float32 where the cut input is a LayerNorm'd or residual float32 stream (timm's
            ViTs and ConvNeXts under autocast), which rounding to bf16 would change.
    """

    trunk: Trunk
    tail: Tail
    cut: str
    feature_shape: tuple[int, ...]
    example_size: tuple[int, int]
    feature_dtype: torch.dtype = torch.float32


def split_model(
    model: nn.Module, tune: str, example: torch.Tensor, autocast: Callable[[], AbstractContextManager] | None = None
) -> Split | None:
    """Split ``model`` before the first block that ``tune`` trains, or None (logged) when that is not possible.

    Args:
        model: A model built by :func:`fgvc.models.create_model` (DDP/compile wrappers are unwrapped).
        tune: The stage-2 policy.
        example: A small ``(B, 3, H, W)`` batch on the model's device; random values, not zeros, so that the check
            ``tail(trunk(x)) == model(x)`` means something.
        autocast: The run's precision (``Runtime.autocast``), under which the trunk runs once more on the example for
            ``Split.feature_dtype``; None: float32.
    """
    net = unwrap_model(model)
    try:
        return _split(net, tune, example, autocast)
    except _NotAChain as why:
        log.info("feature cache: cannot split %s for tune '%s' (%s); training through the whole model",
                 type(net).__name__, tune, why)  # fmt: skip
        return None


def _split(
    net: nn.Module, tune: str, example: torch.Tensor, autocast: Callable[[], AbstractContextManager] | None
) -> Split:
    if tune == "all":
        raise _NotAChain("tune 'all' trains the whole network")
    elements = dict(_chain_elements(net))
    api = _head_api(net)
    head_fn = api[1] if api is not None else None
    order, head_start = _execution_order(net, elements, example, api)
    first = _first_tuned(net, tune, elements, order)
    cut = order[first]
    if head_fn is not None and first < head_start:
        tail = Tail([elements[name] for name in order[first:head_start]], head_fn,
                    [elements[name] for name in order[head_start:]])  # fmt: skip
    else:
        tail = Tail([elements[name] for name in order[first:]])
    trunk = Trunk(net, elements[cut], cut)
    features = _verify(net, trunk, tail, example, cut)
    dtype = features.dtype
    if autocast is not None:
        with modes_restored(net), torch.no_grad(), autocast():
            net.eval()
            dtype = trunk(example).dtype
    return Split(trunk, tail, cut, tuple(features.shape[1:]), (int(example.shape[-2]), int(example.shape[-1])), dtype)


def _is_container(module: nn.Module) -> bool:
    """Containers without behaviour of their own: flattened into their children."""
    plain_sequential = isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
    return plain_sequential or isinstance(module, nn.ModuleList | nn.ModuleDict)


def _chain_elements(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """Top-level children with plain containers flattened (``layer4`` -> ``layer4.0``, ``layer4.1``, ...)."""
    elements = []
    for name, child in module.named_children():
        full = prefix + name
        elements += _chain_elements(child, full + ".") if _is_container(child) else [(full, child)]
    return elements


def _tuned_modules(net: nn.Module, tune: str) -> set[int]:
    """Ids of the modules ``tune`` changes: owners of trainable parameters and modules put in train mode."""
    learning = {id(p) for p in trainable_parameters(net, tune)}
    tuned = {id(m) for m in net.modules() if any(id(p) in learning for p in m.parameters(recurse=False))}
    with modes_restored(net):
        set_train_mode(net, tune)
        tuned |= {id(m) for m in net.modules() if m.training and not _is_container(m)}
    return tuned


def _first_tuned(net: nn.Module, tune: str, elements: dict[str, nn.Module], order: list[str]) -> int:
    """Position in ``order`` of the first block holding a tuned module; every tuned module must be in it or later."""
    tuned = _tuned_modules(net, tune)
    first = next((i for i, name in enumerate(order) if _holds_any(elements[name], tuned)), None)
    if first is None:
        raise _NotAChain("no tuned module runs inside the chain of blocks")
    covered = {id(m) for name in order[first:] for m in elements[name].modules()}
    names = {id(module): name for name, module in net.named_modules()}
    outside = [names[i] or "the model itself" for i in tuned if i not in covered]
    if outside:
        raise _NotAChain(f"tuned module {outside[0]} is not part of a block from {order[first]} on")
    return first


def _holds_any(module: nn.Module, ids: set[int]) -> bool:
    return any(id(m) in ids for m in module.modules())


def _head_api(net: nn.Module) -> tuple[Callable, Callable] | None:
    """The model's ``(features, head)`` methods (timm ``forward_features``/``forward_head``, Cadene
    ``features``/``logits``), whose head is the glue the tail reuses; None for models without them."""
    for features_name, head_name in _HEAD_APIS:
        features, head = getattr(net, features_name, None), getattr(net, head_name, None)
        if _is_method(features) and _is_method(head):
            return features, head
    return None


def _is_method(value: object) -> TypeGuard[Callable[..., Any]]:
    return callable(value) and not isinstance(value, nn.Module) and getattr(value, "__self__", None) is not None


def _execution_order(
    net: nn.Module,
    elements: dict[str, nn.Module],
    example: torch.Tensor,
    api: tuple[Callable, Callable] | None,
) -> tuple[list[str], int]:
    """Chain elements in the order one forward pass calls them, and where the head part starts in that list.

    With a head method the features and the head run separately so that the split point between them is known.
    """
    calls: list[str] = []
    hooks = [
        module.register_forward_pre_hook(lambda _m, _a, name=name: calls.append(name))
        for name, module in elements.items()
    ]
    try:
        with modes_restored(net), torch.no_grad():
            net.eval()
            if api is None:
                net(example)
                head_start = len(calls)
            else:
                features_fn, head_fn = api
                features = features_fn(example)
                head_start = len(calls)
                head_fn(features)
    finally:
        for hook in hooks:
            hook.remove()
    repeated = next((name for name in calls if calls.count(name) > 1), None)
    if repeated is not None:
        raise _NotAChain(f"{repeated} runs more than once per forward pass")
    return calls, head_start


def _verify(net: nn.Module, trunk: Trunk, tail: Tail, example: torch.Tensor, cut: str) -> torch.Tensor:
    """Check ``tail(trunk(x)) == model(x)`` in eval mode; returns the trunk output."""
    with modes_restored(net), torch.no_grad():
        net.eval()
        reference = net(example)
        try:
            features = trunk(example)
            output = tail(features)
        except (RuntimeError, TypeError, ValueError) as err:
            raise _NotAChain(f"tail(trunk(x)) fails with the cut at {cut}: {err}") from err
    if not isinstance(reference, torch.Tensor) or output.shape != reference.shape:
        raise _NotAChain(f"tail(trunk(x)) does not have the shape of model(x) with the cut at {cut}")
    error = (output.float() - reference.float()).abs().max().item()
    scale = reference.float().abs().max().item()
    if not error <= VERIFY_RTOL * max(scale, 1e-12):
        raise _NotAChain(f"tail(trunk(x)) differs from model(x) by {error:.3g} (scale {scale:.3g}) with the cut at "
                         f"{cut}: the forward is not a chain of blocks")  # fmt: skip
    return features


# ---------------------------------------------------------------------------------------------------------------------
# Deciding whether to cache


def cache_bytes_estimate(split: Split, n_images: int, res: int, dtype: torch.dtype) -> int:
    """Bytes of cached features for ``n_images`` square ``res`` crops (labels and row indices are negligible).

    Spatial activations scale with the input side (rounded up, as strided layers do); pooled features do not.
    """
    shape = split.feature_shape
    height, width = split.example_size
    if len(shape) == 3:  # (C, H, W)
        elements = shape[0] * math.ceil(shape[1] * res / height) * math.ceil(shape[2] * res / width)
    elif len(shape) == 1:  # pooled features
        elements = shape[0]
    else:  # tokens or other layouts: scale with the image area
        elements = math.ceil(math.prod(shape) * res * res / (height * width))
    return n_images * elements * dtype.itemsize


def default_budget_bytes(device: torch.device | str) -> int:
    """25 % of the free accelerator memory (CUDA) or of the available RAM (CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # blocks the caching allocator holds unused count as free once handed back
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * BUDGET_FRACTION)
    return int(_available_ram() * BUDGET_FRACTION)


def _available_ram() -> int:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def should_cache(
    mode: str, augment: str, tune: str, estimate: int, budget_bytes: int, world_size: int = 1
) -> tuple[bool, str]:
    """Whether to train from cached features, and why (for the log).

    ``on`` with a setting that makes caching wrong (a random augmentation, ``tune all``, several processes) is a
    :class:`ConfigError`; ``auto`` then just declines. ``on`` ignores the memory budget; ``auto`` needs
    ``estimate <= budget_bytes``.
    """
    if mode not in CACHE_MODES:
        raise ConfigError(f"unknown --cache-features value '{mode}'; choose one of {', '.join(CACHE_MODES)}")
    if mode == "off":
        return False, "feature cache off (--cache-features off)"
    if mode == "on":
        require_cacheable(augment, tune, world_size)
    problem = _cache_problem(augment, tune, world_size)
    if problem is not None:
        return False, f"feature cache not used: {problem}"
    sizes = f"{_gib(estimate)} estimated, budget {_gib(budget_bytes)}"
    if mode == "on":
        return True, f"feature cache on (forced; {sizes})"
    if estimate > budget_bytes:
        return False, f"feature cache not used: the features do not fit ({sizes})"
    return True, f"feature cache on ({sizes})"


def require_cacheable(augment: str, tune: str, world_size: int) -> None:
    """``--cache-features on`` with a setting that makes caching wrong is a :class:`ConfigError` (checked up front)."""
    problem = _cache_problem(augment, tune, world_size)
    if problem is not None:
        raise ConfigError(f"--cache-features on: {problem}; use --cache-features auto or off")


def _cache_problem(augment: str, tune: str, world_size: int) -> str | None:
    if augment != CACHEABLE_AUGMENT:
        return (f"augmentation '{augment}' is random, so the frozen layers' output changes every epoch; caching needs "
                f"the deterministic '{CACHEABLE_AUGMENT}' augmentation")  # fmt: skip
    if tune not in CACHEABLE_TUNES:
        return f"tune '{tune}' trains the whole network, so nothing is frozen; caching needs one of {CACHEABLE_TUNES}"
    if world_size > 1:
        return f"{world_size} processes shard the data per rank and synchronise gradients; caching is single-process"
    return None


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


# ---------------------------------------------------------------------------------------------------------------------
# The cache


@dataclass
class FeatureCache:
    """Trunk outputs of a whole dataset, indexed by dataset row.

    Attributes:
        features: ``(rows, *feature_shape)`` in the cache dtype, on the device or in (pinned) CPU memory.
        labels: ``(rows,)`` int64 on the CPU.
        present: ``(rows,)`` bool on the CPU; False for images the loader skipped as unreadable.
    """

    features: torch.Tensor
    labels: torch.Tensor
    present: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()

    def batches(self, order: Iterable[int | tuple[int, int]], batch_size: int, drop_last: bool) -> CachedBatches:
        """The batches a DataLoader over ``order`` would make, as ``(features, labels, rows)``."""
        return CachedBatches(self, epoch_rows(order), batch_size, drop_last)

    def prepare(self, rt: Runtime) -> Callable[[torch.Tensor], torch.Tensor]:
        """``cached batch -> device tensor``: the ``prepare`` callable of :func:`fgvc.engine.loop.train_one_epoch`."""

        def to_device(features: torch.Tensor) -> torch.Tensor:
            if features.device.type == "cpu" and rt.device.type != "cpu":  # host-memory cache
                if rt.device.type == "cuda":
                    features = features.pin_memory()  # so that the copy below is asynchronous
                features = features.to(rt.device, non_blocking=True)
            if rt.channels_last and features.dim() == 4:
                features = features.contiguous(memory_format=torch.channels_last)
            return features

        return to_device


def epoch_rows(order: Iterable[int | tuple[int, int]]) -> list[int]:
    """Dataset rows from an epoch order: plain rows, or the ``(row, sample_seed)`` pairs an ``EpochSampler`` yields."""
    return [int(item[0]) if isinstance(item, tuple) else int(item) for item in order]


class CachedBatches:
    """Batches of cached features in a given row order, composed exactly as the DataLoader composes image batches.

    ``drop_last`` drops the last incomplete group of ``order``; rows missing from the cache (unreadable images) are
    then dropped from their batch, as :func:`fgvc.data.collate_skip_none` does.
    """

    def __init__(self, cache: FeatureCache, rows: list[int], batch_size: int, drop_last: bool) -> None:
        self.cache = cache
        self.rows = rows
        self.batch_size = batch_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.rows) // self.batch_size
        return math.ceil(len(self.rows) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        present = self.cache.present
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            group = torch.tensor(self.rows[start : start + self.batch_size], dtype=torch.int64)
            rows = group[present[group]]
            features = self.cache.features.index_select(0, rows.to(self.cache.features.device))
            yield features, self.cache.labels[rows], rows


def compute_cache(
    trunk: Trunk,
    loader: DataLoader,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    rt: Runtime,
    progress: bool = True,
    stop: StopFlag | None = None,
) -> FeatureCache:
    """Run the frozen trunk (eval mode, no grad, AMP as configured) over every image of ``loader``, and keep its
    output in the dtype it comes in (:attr:`Split.feature_dtype`: rounding a float32 one would change the result).

    ``loader`` must yield ``(images, labels, rows)`` with the deterministic test transform (e.g. an unshuffled
    :class:`fgvc.data.ImageDataset` loader). The features stay on the accelerator when they fit in
    :func:`default_budget_bytes`, else in pinned CPU memory. Raises :class:`fgvc.engine.loop.Stopped` once ``stop``
    is set (the cache is one process's: no other rank to agree with).
    """
    n_rows = len(cast(Sized, loader.dataset))
    features: torch.Tensor | None = None
    labels = torch.zeros(n_rows, dtype=torch.int64)
    present = torch.zeros(n_rows, dtype=torch.bool)
    started = time.perf_counter()
    bar = progress_bar(loader, desc="caching features", enabled=progress and rt.is_main)
    with modes_restored(trunk.model), torch.no_grad():
        trunk.model.eval()
        for images, batch_labels, rows in bar:
            if stop:
                raise Stopped
            if len(rows) == 0:
                continue
            with rt.autocast():
                out = trunk(prepare(images))
            if features is None:
                features = _allocate(n_rows, tuple(out.shape[1:]), out.dtype, rt)
            features[rows.to(features.device)] = out.to(features.device)
            labels[rows] = batch_labels.to(torch.int64)
            present[rows] = True
    if features is None:
        raise ValueError("the loader yielded no images to cache")
    cache = FeatureCache(features, labels, present)
    where = "on " + str(rt.device) if features.device.type != "cpu" else "in CPU memory"
    log.info("feature cache: %d images at the input of %s, %s %s, %.0f MiB %s, in %.1f s", int(present.sum()),
             trunk.cut, tuple(features.shape[1:]), str(features.dtype).replace("torch.", ""), cache.nbytes / 2**20,
             where, time.perf_counter() - started)  # fmt: skip
    return cache


def _allocate(n_rows: int, shape: tuple[int, ...], dtype: torch.dtype, rt: Runtime) -> torch.Tensor:
    """Storage for every row: on the accelerator when it fits the budget, else pinned host memory."""
    needed = n_rows * math.prod(shape) * dtype.itemsize
    if rt.device.type == "cuda":
        if needed <= default_budget_bytes(rt.device):
            return torch.zeros((n_rows, *shape), dtype=dtype, device=rt.device)
        return torch.zeros((n_rows, *shape), dtype=dtype, pin_memory=True)
    return torch.zeros((n_rows, *shape), dtype=dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Training from the cache


def train_one_epoch_cached(
    tail: Tail,
    cache: FeatureCache,
    order: Iterable[int | tuple[int, int]],
    batch_size: int,
    drop_last: bool,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    scaler: torch.amp.GradScaler | None,
    rt: Runtime,
    criterion: nn.Module,
    grad_accum: int = 1,
    stop: StopFlag | None = None,
    start_micro_step: int = 0,
    desc: str = "train (cached)",
    progress: bool = True,
) -> EpochStats:
    """One epoch through the tail on cached features; the same contract as :func:`fgvc.engine.loop.train_one_epoch`.

    Args:
        order: This epoch's dataset rows, in the order the uncached loader would read them: iterate the run's
            ``EpochSampler`` after ``set_epoch`` (it may be passed directly), so that batches match exactly.
        batch_size, drop_last: As given to the uncached loader.

    Call :func:`fgvc.models.set_train_mode` on the full model first: the tail shares its modules and their modes.
    """
    if rt.distributed:
        raise ValueError("train_one_epoch_cached is single-process; should_cache refuses caching with several ranks")
    batches = cache.batches(order, batch_size, drop_last)
    return train_one_epoch(
        tail, batches, optimizer, scheduler, scaler, rt, cache.prepare(rt), criterion,
        grad_accum=grad_accum, stop=stop, start_micro_step=start_micro_step, batch_size=batch_size,
        samples=len(batches.rows), desc=desc, progress=progress,
    )  # fmt: skip

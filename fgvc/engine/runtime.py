"""Where the computation runs: device, precision, distributed process group, determinism.

Everything the loop needs to know about the hardware is resolved once into a :class:`Runtime`, so the engine never
looks at environment variables or CLI flags itself.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fgvc.config import RuntimeConfig
from fgvc.errors import ConfigError

log = logging.getLogger("fgvc")

T = TypeVar("T")
CUBLAS_WORKSPACE = "CUBLAS_WORKSPACE_CONFIG"  # cuBLAS reproducibility needs it set before its first call


@dataclass
class Runtime:
    """Resolved hardware and precision settings for one process."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None: full fp32
    channels_last: bool
    rank: int = 0
    world_size: int = 1
    flag_group: Any = None  # a gloo group for per-step flags under NCCL: agreeing on one needs no GPU synchronisation

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def needs_grad_scaler(self) -> bool:
        return self.amp_dtype == torch.float16

    def autocast(self) -> AbstractContextManager:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def place(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device in the run's memory format (in place; returned for chaining)."""
        return model.to(self.device, memory_format=self.memory_format)  # type: ignore[call-overload]  # stubs lack it

    def describe(self) -> str:
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        layout = "channels_last" if self.channels_last else "NCHW"
        return f"{name} x{self.world_size}, {precision}, {layout}"


def _amp_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    if not amp or device.type != "cuda":
        return None  # AMP on CPU is slower than fp32 for convnets and changes the numerics; keep fp32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def settings_restored() -> Iterator[None]:
    """Process-wide settings a stage or a prediction changes, as they were before it, once it returns or fails.

    A notebook runs many calls in one process: a run with ``runtime.deterministic`` must not leave the next one on
    deterministic (slower) kernels, and the caller's random streams are the caller's.
    """
    backends = torch.backends
    flags = (backends.cudnn.benchmark, backends.cudnn.deterministic, backends.cudnn.allow_tf32,
             backends.cuda.matmul.allow_tf32)  # fmt: skip
    algorithms = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    workspace = os.environ.get(CUBLAS_WORKSPACE)
    python_rng, numpy_rng = random.getstate(), np.random.get_state()
    # The caller's current GPU, and its generator: another device's would open a CUDA context there (every rank,
    # every GPU). A process that has not used CUDA yet has no generator state of its own to keep.
    cuda_devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        if cuda_devices:
            torch.cuda.set_device(cuda_devices[0])
        (backends.cudnn.benchmark, backends.cudnn.deterministic, backends.cudnn.allow_tf32,
         backends.cuda.matmul.allow_tf32) = flags  # fmt: skip
        torch.use_deterministic_algorithms(algorithms[0], warn_only=algorithms[1])
        if workspace is None:
            os.environ.pop(CUBLAS_WORKSPACE, None)
        else:
            os.environ[CUBLAS_WORKSPACE] = workspace
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)


_flag_group: Any = None  # the host-side group of this process's process group (see Runtime.flag_group)


_ON_CPU = "run on the CPU: --device cpu, or runtime.device: cpu in a recipe"


def local_processes() -> int:
    """The processes torchrun started on this machine (``LOCAL_WORLD_SIZE``; all of them on one machine)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def _chosen_device(name: str | None, local_world_size: int, local_rank: int) -> torch.device:
    """``name`` (None: GPU ``LOCAL_RANK`` where CUDA is available, else the CPU), or a one-line error saying why this
    machine or this launch cannot use it."""
    if not name:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        name = "cuda"
    device = torch.device(name)
    own_gpu = device.type == "cuda" and device.index is None  # each process takes GPU LOCAL_RANK
    if device.type == "cuda" and not own_gpu and local_world_size > 1:
        raise ConfigError(f"runtime.device {name} would put all {local_world_size} processes on this machine on one "
                          "GPU; each takes its own under --gpus: use --device cuda")  # fmt: skip
    if own_gpu:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device {name}: no CUDA device is available here; {_ON_CPU}")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and (device.index or 0) >= count:
        if own_gpu:
            raise ConfigError(f"{local_world_size} processes on this machine need {local_world_size} visible GPUs, it "
                              f"has {count}: use --gpus {count} (torchrun --nproc_per_node) or fewer, or --device "
                              "cpu")  # fmt: skip
        raise ConfigError(f"runtime.device {device}: this machine has {count} visible CUDA device(s), cuda:0 to "
                          f"cuda:{count - 1}; choose one with --device (runtime.device in a recipe)")  # fmt: skip
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"runtime.device {name}: no Apple GPU (MPS) is available here; {_ON_CPU}")
    return device


def device_problem(name: str) -> str | None:
    """Why this machine and this launch cannot run on device ``name`` (None: they can): setup_runtime's refusal."""
    try:
        _chosen_device(name, local_processes(), int(os.environ.get("LOCAL_RANK", "0")))
    except ConfigError as err:
        return str(err)
    return None


# The releases that carry the fix of https://github.com/python/cpython/issues/112275 (3.12 never had the bug)
_FORK_FIXED_IN = {(3, 8): 20, (3, 9): 20, (3, 10): 15, (3, 11): 10}
_fork_warned = False


def fork_can_deadlock(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> bool:
    """Whether this CPython can leave a forked child hung for good (gh-112275).

    A thread that Python did not start (a C++ thread of torch.distributed calling back into Python) takes the
    interpreter's thread-list lock while it registers; a fork at that moment copies the lock held, and the child waits
    on it before running any Python. Seen here once, in a run of two CPU processes, as a validation loader forked its
    workers. Starting workers from a fork server instead costs a copy of the dataset per worker, keeps their log lines
    out of train.log and ties them to a process that a group SIGTERM kills: so the run says it, once.
    """
    fixed = _FORK_FIXED_IN.get((version[0], version[1]))
    return fixed is not None and version[2] < fixed


def _warn_about_fork_once(world_size: int, rank: int) -> None:
    global _fork_warned
    if world_size > 1 and rank == 0 and not _fork_warned and fork_can_deadlock():
        _fork_warned = True
        version = ".".join(map(str, sys.version_info[:3]))
        fixed = _FORK_FIXED_IN[(sys.version_info[0], sys.version_info[1])]
        log.warning("Python %s can hang a loader worker as it starts in a multi-process run (CPython bug gh-112275, "
                    "fixed in %d.%d.%d): if a run stops making progress at the start of an epoch or of validation, "
                    "stop it (it resumes) and use a newer Python", version, sys.version_info[0], sys.version_info[1],
                    fixed)  # fmt: skip


def setup_runtime(cfg: RuntimeConfig) -> Runtime:
    """Initialise the process group when launched by torchrun, pick the device and precision, set seeds.

    Under torchrun (WORLD_SIZE > 1) each process binds to GPU ``LOCAL_RANK`` and joins an NCCL group (gloo on CPU).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _chosen_device(cfg.device, local_processes(), local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    global _flag_group
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if world_size > 1 and device.type == "cuda" and _flag_group is None:  # once per process: sweeps set up many times
        _flag_group = dist.new_group(backend="gloo")  # collective: every rank creates it here, in the same order
    if cfg.deterministic:
        os.environ.setdefault(CUBLAS_WORKSPACE, ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
    seed_everything(cfg.seed + rank)
    _warn_about_fork_once(world_size, rank)
    return Runtime(
        device=device,
        amp_dtype=_amp_dtype(device, cfg.amp),
        channels_last=cfg.channels_last,
        rank=rank,
        world_size=world_size,
        flag_group=_flag_group if world_size > 1 and device.type == "cuda" else None,
    )


def is_main_process() -> bool:
    """Rank 0, or a process outside torchrun; known before :func:`setup_runtime` (what the CLI prints, who writes)."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def all_reduce_sum(rt: Runtime, values: list[float]) -> list[float]:
    """Sum scalars across ranks (identity in a single process)."""
    if not rt.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def any_rank(rt: Runtime, flag: bool) -> bool:
    """True on every rank when it is true on one (e.g. a signal that reached only some processes)."""
    return bool(max_over_ranks(rt, int(flag)))


def max_over_ranks(rt: Runtime, value: int) -> int:
    """The largest of the ranks' ``value`` (small ints: flags, signal numbers), on every rank."""
    if not rt.distributed:
        return value
    if rt.flag_group is not None:  # on the host: reading the result does not wait for the GPU's queued work
        t = torch.tensor([float(value)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=rt.flag_group)
        return int(t.item())
    t = torch.tensor([float(value)], device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def gather_objects(rt: Runtime, obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (a one-element list in a single process)."""
    if not rt.distributed:
        return [obj]
    out: list[Any] = [None] * rt.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(rt: Runtime, obj: T) -> T:
    """Rank 0's ``obj`` on every rank (``obj`` itself in a single process): a decision or a result only rank 0 has."""
    if not rt.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=rt.flag_group)  # on the host under NCCL: no device round trip
    return box[0]


def gather_rows_on_main(rt: Runtime, rows: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's ``rows`` (one per dataset index in ``idx``) as one matrix in dataset order, on rank 0.

    The other ranks get empty arrays. Shares travel point to point over the host group in blocks of about 64 MiB
    that land in their final rows, so rank 0 holds the matrix plus one block and no other rank more than its own
    share. ``all_gather_object`` gave every rank every share, their concatenation and its sorted copy: 3.0 matrices
    per process (``benchmarks/gather_memory.py``), where iNat 2021's test matrix alone is 20 GB.
    """
    width = rows.shape[1] if rows.ndim == 2 and len(rows) else 0
    shares: list[Any] | None = [None] * rt.world_size if rt.is_main else None
    dist.gather_object((idx, width), shares, dst=0, group=rt.flag_group)
    width = max(w for _, w in shares) if shares is not None else width
    if shares is None:
        for start, stop in _blocks(len(idx), width):
            block = np.ascontiguousarray(rows[start:stop], dtype=np.float32)  # what rank 0 receives into
            dist.send(torch.from_numpy(block), dst=0, group=rt.flag_group)
        return np.zeros((0, width), np.float32), np.zeros(0, np.int64)
    every = np.sort(np.concatenate([share_idx for share_idx, _ in shares]))
    out = np.empty((len(every), width), np.float32)
    for src, (share_idx, _) in enumerate(shares):
        where = np.searchsorted(every, share_idx)  # indices are unique: evaluation shards never repeat an image
        if src == 0:
            if len(where):  # an empty share may be (0, 0): it has no width to broadcast from
                out[where] = rows
            continue
        for start, stop in _blocks(len(share_idx), width):
            received = torch.empty((stop - start, width), dtype=torch.float32)
            dist.recv(received, src=src, group=rt.flag_group)
            out[where[start:stop]] = received.numpy()
    return out, every


GATHER_BLOCK_BYTES = 64 << 20


def _blocks(count: int, width: int) -> list[tuple[int, int]]:
    """Row ranges of about ``GATHER_BLOCK_BYTES`` of float32 each; sender and receiver compute the same ones."""
    step = max(1, GATHER_BLOCK_BYTES // max(4 * width, 1))
    return [(start, min(start + step, count)) for start in range(0, count, step)] if width else []


def teardown() -> None:
    """Leave the process group at the end of a command every rank finished. Left to the interpreter's own exit,
    gloo's worker threads can abort the process (SIGABRT, "terminate called without an active exception",
    pytorch#190489): a finished rank then exits 134 instead of 0."""
    global _flag_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _flag_group = None

"""Where and how computation runs: devices, numeric precision, threads, torchrun ranks.

One owner for what training, inference and cross-validation all need:

- **devices**: :func:`resolve_device` (``auto`` -> CUDA when available; names checked, one clear
  error for a device this machine does not have); :func:`resolve_train_device` (a torchrun
  rank's own GPU);
- **precision**: one vocabulary, :data:`PRECISIONS` = ``auto`` / ``fp32`` / ``bf16`` / ``fp16``
  (``train.amp`` spells fp32 ``off``, kept for its configs: :func:`precision_name`), and
  :func:`autocast_dtype`;
- **threads**: :func:`set_threads` (``train.threads``, ``inference.threads``);
- **torchrun**: :func:`torchrun_rank` ((rank, world size) from the environment),
  :func:`shard` (a rank's share of a list), :func:`join_process_group` / :func:`barrier`
  (gloo, for CPU barriers between ranks of batch jobs; DDP training has its own set-up in
  :mod:`medseg.engine.distributed`);
- **allocator policy**: :func:`keep_freed_memory` (below).

Allocator policy.

glibc's ``malloc`` serves every request above its mmap threshold (at most 32 MB) with a fresh
``mmap`` and hands it back to the kernel on ``free``. A volume pipeline allocates many such
buffers per case (a 240x240x155 float32 volume is 36 MB; read, orient, crop, normalise,
slice stacks, probabilities, inversion to the source grid...), and each one is new memory
the kernel must map and zero page by page on first touch. On a BraTS case that was about
88,000 page faults for the work around the network (read, preprocess, slice stacks,
inversion, post-processing, writing); with the policy below about 4,000, and that work ran
1.16x faster (``benchmarks/bench_allocator.py``, docs/benchmarks.md).

:func:`keep_freed_memory` tells glibc to serve large requests from its heap
(``M_MMAP_MAX = 0``) and not to trim the heap on ``free`` (``M_TRIM_THRESHOLD``), so a buffer
freed by one case is reused by the next without new page faults. The same buffers exist at
the same time, so the peak grows only by the heap's fragmentation (960 -> 1089 MB over 36
BraTS cases, flat from the first pass on); what changes is that the process keeps its
high-water mark until it exits instead of returning freed pages to the system. That suits a batch
inference process; a long-lived server embedding medseg next to other work can leave it off
(``InferenceConfig.keep_freed_memory``). No-op (returns False) where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from collections.abc import Sequence
from typing import TypeVar

import torch

from medseg.errors import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
T = TypeVar("T")


# --------------------------------------------------------------------------- devices


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU; ``cpu``, ``cuda``, ``cuda:N`` as asked.

    Raises ``ConfigError`` for a name torch does not know, a device type other than CPU/CUDA,
    or a CUDA device this machine does not have (instead of a traceback on first use).
    """
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r}: not a device name; use auto, cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: medseg runs on cpu or cuda (auto picks CUDA when available)")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device!r}: no CUDA GPU is available to this torch "
                              f"({torch.__version__}); use --device cpu or auto")  # fmt: skip
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return resolved


def resolve_train_device(preference: str, local_rank: int = 0) -> torch.device:
    """``train.device``: ``auto`` -> ``cuda:<local_rank>`` when a GPU is available, else the CPU."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' was asked for but no CUDA GPU is available (use 'auto' or 'cpu')")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


# --------------------------------------------------------------------------- precision


def precision_name(setting: str) -> str:
    """A precision setting in :data:`PRECISIONS` terms (``train.amp: off`` is ``fp32``)."""
    name = {"off": "fp32"}.get(setting, setting)
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {setting!r}; valid: {', '.join(PRECISIONS)} (or off = fp32)")
    return name


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AVX-512 BF16 or AMX instructions (bf16 matmuls in hardware)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check is not None and check() for check in checks)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (:func:`precision_name`) on ``device``; ``None`` = fp32.

    ``auto``: bf16 on CPUs with AVX-512 BF16 or AMX instructions (2.5x faster than fp32 on a
    6.5 M-parameter U-Net there) and on CUDA GPUs that support bf16 (else fp16); fp32 elsewhere
    (AVX2-only CPUs compute bf16 slower than fp32).
    """
    name = precision_name(precision)
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """``torch.autocast`` on ``device`` to ``dtype`` (from :func:`autocast_dtype`); disabled for
    ``None`` (fp32)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


# --------------------------------------------------------------------------- torchrun


def torchrun_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment (``RANK``, ``WORLD_SIZE``); (0, 1) otherwise."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank ``rank``'s share: items rank, rank + world, ... (balanced to within one item)."""
    return list(items[rank::world])


def join_process_group(world: int) -> bool:
    """Join torchrun's process group (gloo: CPU barriers only); True when this call created it."""
    if world <= 1:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    dist.init_process_group("gloo")
    return True


def leave_process_group(created: bool) -> None:
    """Destroy the process group when :func:`join_process_group` created it."""
    if created:
        import torch.distributed as dist

        dist.destroy_process_group()


def barrier(world: int) -> None:
    """Wait for every rank (no-op for one process)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# --------------------------------------------------------------------------- threads


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads(threads)``; ``None`` keeps torch's default (one per core)."""
    if threads is not None:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- allocator policy


M_TRIM_THRESHOLD = -1  # glibc <malloc.h> parameter numbers
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2**31 - 1  # the largest int mallopt takes: trim only a free top of the heap above 2 GiB

_applied = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (module docstring, "Allocator policy"). Idempotent; process-wide.

    Returns True when the policy is in effect (now or from an earlier call), False where it
    cannot be applied (not glibc, or ``mallopt`` refused).
    """
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) != 1:
        log.debug("mallopt refused the allocator policy; keeping glibc's defaults")
        return False
    _applied = True
    return True

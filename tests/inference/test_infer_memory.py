"""The inference allocator policy (``medseg.runtime.keep_freed_memory``), checked in fresh
processes: it is process-wide, and the page-fault counts must not depend on earlier tests."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
from conftest import save_tiny_checkpoint

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the policy is glibc's mallopt"
)

# minor page faults of malloc-ing and filling 64 MB again after freeing an equal block
PROBE = """
import ctypes, json, resource, sys
from medseg.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "1" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def filled_block():
    block = libc.malloc(64 * 2**20)
    libc.memset(block, 1, 64 * 2**20)  # touch every page
    return block
libc.free(filled_block())
before = faults()
libc.free(filled_block())
print(json.dumps({"applied": applied, "again": keep_freed_memory() if applied else None, "faults": faults() - before}))
"""


def _probe(apply: bool) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, "1" if apply else "0"], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def test_freed_buffers_are_reused_without_new_page_faults():
    pages = 64 * 2**20 // 4096
    default = _probe(apply=False)
    kept = _probe(apply=True)
    assert default["faults"] > pages // 2  # glibc's default: a fresh mmap, every page faulted in again
    assert kept["applied"] is True and kept["again"] is True  # idempotent
    assert kept["faults"] < pages // 20  # the freed heap memory is reused


LOAD = """
import json, sys
import medseg.runtime
from medseg.inference.runner import load_bundle
load_bundle([sys.argv[1]], sys.argv[2:])
print(json.dumps(medseg.runtime._applied))
"""


@pytest.mark.parametrize(("overrides", "expected"), [([], True), (["inference.keep_freed_memory=false"], False)])
def test_load_bundle_applies_the_policy_unless_switched_off(tmp_path, overrides, expected):
    path = save_tiny_checkpoint(tmp_path / "tiny.pt", ["flair", "t1"], "MR")
    proc = subprocess.run([sys.executable, "-c", LOAD, str(path), *overrides], capture_output=True, text=True, check=True)
    assert json.loads(proc.stdout) is expected

"""reused_host_memory: freed blocks stay in the process for the next allocation, and go back to the
kernel on leaving. Measured by the resident set (page-fault counts depend on transparent huge pages)."""

import platform
import resource

import numpy as np
import pytest

from models.host_memory import reused_host_memory

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc; a no-op elsewhere")

BLOCK = 64 * 2**20  # above glibc's largest mmap threshold (32 MB): by default a map of its own


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def fill_and_free_a_block() -> None:
    block = np.ones(BLOCK, np.uint8)  # written through: every page becomes resident
    del block


def test_inside_a_freed_block_is_kept_and_reused_and_on_leaving_it_goes_back_to_the_kernel():
    baseline = resident_bytes()
    fill_and_free_a_block()
    assert resident_bytes() - baseline < BLOCK / 4  # the default: unmapped when freed
    with reused_host_memory():
        fill_and_free_a_block()
        assert resident_bytes() - baseline > BLOCK * 3 / 4  # kept
        fill_and_free_a_block()
        assert resident_bytes() - baseline < BLOCK * 5 / 4  # reused, not a second block
    assert resident_bytes() - baseline < BLOCK / 4


def test_a_nested_use_leaves_the_setting_to_the_outer_one():
    baseline = resident_bytes()
    with reused_host_memory():
        with reused_host_memory():
            pass
        fill_and_free_a_block()
        assert resident_bytes() - baseline > BLOCK * 3 / 4
    assert resident_bytes() - baseline < BLOCK / 4

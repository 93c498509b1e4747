"""Shared-memory objects and regions without servers: key checks, bounds, truncation, tenants, identity."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from multiprocessing import shared_memory

import numpy as np
import pytest

from services.gateway.core.shm import SharedMemoryRegions
from shared.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from shared.kserve.codec import write_raw_output
from shared.kserve.metadata import SHARED_MEMORY_UNREACHABLE
from shared.kserve.shm import SharedMemoryFile, object_name


@pytest.fixture
def shm() -> Iterator[shared_memory.SharedMemory]:
    made = shared_memory.SharedMemory(f"maas-unit-{uuid.uuid4().hex[:12]}", create=True, size=4096)
    yield made
    made.close()
    made.unlink()


def key(made: shared_memory.SharedMemory) -> str:
    return "/" + made.name.lstrip("/")


@pytest.mark.parametrize("bad", ["", "/", "//", "a/b", "/a/../b", "/..", "..", "/.", "x\x00", "/" + "n" * 256])
def test_keys_that_could_leave_dev_shm_are_refused(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="key"):
        object_name(bad)


def test_keys_lose_their_leading_slashes_as_shm_open_does() -> None:
    assert object_name("/input0") == "input0"
    assert object_name("//input0") == "input0"
    assert object_name("input0") == "input0"


def test_a_window_is_a_view_and_truncation_is_caught(shm: shared_memory.SharedMemory) -> None:
    file = SharedMemoryFile(key(shm), 2048)
    window = file.window(1024, 16)
    window[:4] = b"abcd"
    assert bytes(shm.buf[1024:1028]) == b"abcd"  # the same memory, no copy
    window.release()
    os.truncate(f"/dev/shm/{shm.name.lstrip('/')}", 1000)
    with pytest.raises(FailedPrecondition, match="truncated"):
        file.window(0, 8)
    file.close()
    with pytest.raises(FailedPrecondition, match="no longer registered"):
        file.window(0, 8)


def test_regions_are_per_tenant_and_bounds_checked(shm: shared_memory.SharedMemory) -> None:
    regions = SharedMemoryRegions(max_regions=4)
    regions.register("a", "r", key(shm), 100, 200)
    with pytest.raises(AlreadyExists):
        regions.register("a", "r", key(shm), 0, 8)
    regions.register("b", "r", key(shm), 0, 8)  # another tenant's namespace
    window = regions.window("a", "r", 50, 150, "input 'x'")
    assert (window.offset, window.byte_size) == (150, 150)
    with pytest.raises(InvalidArgument, match=r"input 'x'.*exceeds region 'r' of 200 bytes"):
        regions.window("a", "r", 51, 150, "input 'x'")
    with pytest.raises(NotFound, match="'r' is not registered"):
        regions.window("c", "r", 0, 8, "input 'x'")
    regions.unregister("c", "r")  # nothing of c's: no error, nothing else removed
    assert [r.name for r in regions.status("a")] == ["r"] and [r.name for r in regions.status("b")] == ["r"]
    window.data.release()
    regions.close()
    assert regions.status("a") == []


def test_outputs_are_written_with_one_copy_and_must_fit() -> None:
    room = bytearray(64)
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert write_raw_output(value, memoryview(room), "y") == ("FP32", (2, 3), 24)
    np.testing.assert_array_equal(np.frombuffer(bytes(room[:24]), np.float32), value.reshape(-1))
    with pytest.raises(InvalidArgument, match="output 'y': 24 bytes do not fit"):
        write_raw_output(value, memoryview(room)[:20], "y")
    strings = np.array([[b"ab"], [b"c"]], dtype=object)
    assert write_raw_output(strings, memoryview(room), "s") == ("BYTES", (2, 1), 11)


def test_a_worker_uses_a_window_only_on_the_gateways_object(shm: shared_memory.SharedMemory) -> None:
    from maas.inference.v1 import worker_pb2 as wpb

    from services.inference.api.shm import SharedMemoryMaps

    opened = SharedMemoryFile(key(shm), 64)
    identity = opened.identity
    opened.close()
    maps = SharedMemoryMaps(max_objects=1)
    tensor = wpb.SharedMemoryTensor(
        name="x", key=key(shm), offset=8, byte_size=16, device=identity.device, inode=identity.inode
    )
    assert len(maps.window(tensor)) == 16
    elsewhere = wpb.SharedMemoryTensor()
    elsewhere.CopyFrom(tensor)
    elsewhere.inode = identity.inode + 1  # another object under the same name: another host's
    with pytest.raises(FailedPrecondition) as info:
        maps.window(elsewhere)
    assert info.value.reason == SHARED_MEMORY_UNREACHABLE
    missing = wpb.SharedMemoryTensor(name="x", key=f"/maas-unit-missing-{uuid.uuid4().hex[:8]}", byte_size=8)
    with pytest.raises(FailedPrecondition) as info:
        maps.window(missing)
    assert info.value.reason == SHARED_MEMORY_UNREACHABLE
    maps.close()

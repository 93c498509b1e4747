"""Triton's system shared-memory regions as the gateway keeps them: per tenant, mapped once at registration.

A region is a window (``offset``, ``byte_size``) of a POSIX shared-memory object on the gateway's host.
Registering maps it (``shared.kserve.shm``); requests then name windows of it by ``(region, offset,
byte_size)`` for their inputs and outputs, checked here against the region's bounds. Regions belong to the
tenant of the caller that registered them: another tenant's region is, to a caller, one that does not
exist (NOT_FOUND on use; absent from the status; unregistering it does nothing, as unregistering an
unknown region does in Triton).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from shared.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from shared.kserve.shm import SHM_ROOT, FileIdentity, SharedMemoryFile

_NAME_MAX = 256


@dataclass(frozen=True)
class RegionInfo:
    """A registered region, as SystemSharedMemoryStatus reports it."""

    name: str
    key: str
    offset: int
    byte_size: int


@dataclass(frozen=True)
class Window:
    """Part of a region one tensor uses: its bytes (a writable view, no copy) and where they are in the
    shared-memory object (``key``, ``offset`` from the object's start), which a worker on the same host can
    map itself."""

    data: memoryview
    key: str
    offset: int
    identity: FileIdentity

    @property
    def byte_size(self) -> int:
        return len(self.data)


class _Region:
    __slots__ = ("file", "info")

    def __init__(self, info: RegionInfo, file: SharedMemoryFile) -> None:
        self.info = info
        self.file = file


class SharedMemoryRegions:
    """The registered regions of every tenant.

    Args:
        max_regions: Regions one tenant may hold at once (each holds an open file and a mapping).
        root: Directory of the shared-memory objects.
        opener: Maps an object (``SharedMemoryFile``; tests may count openings).
    """

    def __init__(
        self,
        max_regions: int = 64,
        root: str = SHM_ROOT,
        opener: Callable[[str, int, str], SharedMemoryFile] = SharedMemoryFile,
    ) -> None:
        self._max_regions = max_regions
        self._root = root
        self._open = opener
        self._regions: dict[str, dict[str, _Region]] = {}

    def register(self, tenant: str, name: str, key: str, offset: int, byte_size: int) -> RegionInfo:
        """Maps ``byte_size`` bytes from ``offset`` of the object ``key`` as region ``name`` of ``tenant``.

        Raises:
            InvalidArgument: A bad name, key or size, or a window past the object's end.
            AlreadyExists: The tenant already has a region called ``name``.
            ResourceExhausted: The tenant holds ``max_regions`` regions.
            NotFound: No object has that key.
        """
        if not name or len(name) > _NAME_MAX or "\x00" in name:
            raise InvalidArgument.field("name", f"must be 1 to {_NAME_MAX} characters without NUL")
        if byte_size <= 0:
            raise InvalidArgument.field("byte_size", "must be > 0")
        owned = self._regions.get(tenant, {})
        if name in owned:
            raise AlreadyExists(f"shared-memory region '{name}' is already registered; unregister it first")
        if len(owned) >= self._max_regions:
            raise ResourceExhausted(
                f"{len(owned)} shared-memory regions are registered, the most one tenant may hold; unregister one first"
            )
        file = self._open(key, offset + byte_size, self._root)
        info = RegionInfo(name=name, key=key, offset=offset, byte_size=byte_size)
        self._regions.setdefault(tenant, {})[name] = _Region(info, file)
        return info

    def status(self, tenant: str, name: str = "") -> list[RegionInfo]:
        """The tenant's regions (empty ``name``: all of them), by name.

        Raises:
            NotFound: ``name`` is not one of the tenant's regions.
        """
        owned = self._regions.get(tenant, {})
        if name:
            return [self._get(owned, name).info]
        return [owned[n].info for n in sorted(owned)]

    def unregister(self, tenant: str, name: str = "") -> None:
        """Forgets the tenant's region ``name`` (empty: all of its regions); an unknown name is no error."""
        owned = self._regions.get(tenant, {})
        names = [name] if name else list(owned)
        for each in names:
            region = owned.pop(each, None)
            if region is not None:
                region.file.close()
        if not owned:
            self._regions.pop(tenant, None)

    def window(self, tenant: str, name: str, offset: int, byte_size: int, what: str) -> Window:
        """The window ``[offset, offset + byte_size)`` of the tenant's region ``name``, for ``what``
        (``input 'x'``), as a writable view of the mapping.

        Raises:
            NotFound: The tenant has no region called ``name``.
            InvalidArgument: The window does not lie inside the region.
            FailedPrecondition: The object was truncated since it was registered.
        """
        region = self._get(self._regions.get(tenant, {}), name)
        size = region.info.byte_size
        if offset < 0 or byte_size < 0 or offset + byte_size > size:
            raise InvalidArgument(
                f"{what}: shared-memory offset {offset} + byte size {byte_size} exceeds region '{name}' of {size} bytes"
            )
        start = region.info.offset + offset
        return Window(region.file.window(start, byte_size), region.info.key, start, region.file.identity)

    @staticmethod
    def _get(owned: dict[str, _Region], name: str) -> _Region:
        region = owned.get(name)
        if region is None:
            raise NotFound(f"shared-memory region '{name}' is not registered")
        return region

    def close(self) -> None:
        """Unmaps every region (the gateway stops)."""
        for tenant in list(self._regions):
            self.unregister(tenant)


class SharedMemoryUnreachable(Exception):
    """The replica cannot map the gateway's shared memory (another host or namespace, or no InferStream
    to carry the windows): the request's data must travel inline to it."""


@dataclass(frozen=True)
class SharedMemoryCall:
    """A request whose tensors live in shared memory, in the two forms a replica may receive it.

    Attributes:
        payload: The request without the shared-memory parameters and without the data of its
            shared-memory inputs, for a replica on this host.
        windows: The windows (serialized, opaque to the core) that replica maps itself.
        inline: Builds the request with the inputs' data copied in, for a replica elsewhere.
        finish_inline: Copies the outputs of the answer to ``inline`` into their windows; returns the
            answer for the client.
    """

    payload: bytes
    windows: bytes
    inline: Callable[[], bytes]
    finish_inline: Callable[[bytes], bytes]

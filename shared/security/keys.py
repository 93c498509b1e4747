"""Tenants' API keys: roles, tokens, and the one key file every service of a mesh reads.

A token is ``maas_<key id>_<secret>``; the file keeps only a salted scrypt hash of the secret per key. Services
re-read the file when it changes, so ``maas keys revoke`` takes effect without a restart.

Besides its role, a key may hold grants: named permissions a role alone does not give (``GRANTS``).
"""

from __future__ import annotations

import builtins
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

from shared.errors import AlreadyExists, InvalidArgument, NotFound
from shared.names import check_name
from shared.security.files import write_atomic

TOKEN_PREFIX = "maas_"
MAX_TOKEN_LENGTH = 200
FORMAT_VERSION = 1  # ``grants`` was added later as an optional field: files without it still load
# May set, move and delete protected aliases (the registry's ``production``) within the key's tenant.
GRANT_PROTECTED_ALIASES = "protected-aliases"
# The grants a key may be created with.
GRANTS = frozenset({GRANT_PROTECTED_ALIASES})
# The key id is plain hex so that it can never be confused with the separator; the secret is token_urlsafe.
_TOKEN = re.compile(r"maas_([0-9a-f]{12})_([A-Za-z0-9_-]+)")
_KEY_ID = re.compile(r"[0-9a-f]{12}")
_T = TypeVar("_T")


class Role(StrEnum):
    """What a key may do; each role includes everything of the roles below it."""

    ADMIN = "admin"  # everything, every tenant
    DEVELOPER = "developer"  # train, register, deploy within its tenant
    INFERENCE = "inference"  # ModelInfer, streams, metadata, ready, statistics only

    def allows(self, required: Role) -> bool:
        """Whether this role grants what ``required`` grants (admin >= developer >= inference)."""
        return _RANK[self] >= _RANK[required]


_RANK = {Role.INFERENCE: 0, Role.DEVELOPER: 1, Role.ADMIN: 2}


@dataclass(frozen=True)
class ApiKey:
    """A key as clients and operators see it: never its secret nor its hash."""

    key_id: str
    tenant: str
    role: Role
    name: str  # a human label, unique among a tenant's live keys
    created_at: float  # unix seconds
    revoked_at: float | None = None
    grants: tuple[str, ...] = ()  # sorted, no duplicates (GRANTS)

    @property
    def revoked(self) -> bool:
        """Whether the key was revoked (a revoked key never verifies again)."""
        return self.revoked_at is not None


def _new_hash(secret: str, n: int) -> dict[str, Any]:
    # n, r and p are stored with each hash, so the cost can be raised for new keys without breaking old ones.
    salt = secrets.token_bytes(16)
    digest = _scrypt(secret, salt, n, 8, 1, 32)
    return {"alg": "scrypt", "n": n, "r": 8, "p": 1, "salt": salt.hex(), "digest": digest.hex()}


def _check_hash(data: dict[str, Any]) -> dict[str, Any]:
    n, r, p = data["n"], data["r"], data["p"]
    ints = all(type(v) is int and v >= 1 for v in (n, r, p))
    # Checked on load so that verify() can never fail on a parameter or a field hashlib refuses.
    if data["alg"] != "scrypt" or not ints or n < 2 or n & (n - 1) or _maxmem(n, r, p) > 2**31 - 1:
        raise ValueError(f"unsupported hash {data['alg']!r} (n={n!r}, r={r!r}, p={p!r})")
    if len(bytes.fromhex(data["salt"])) < 16 or len(bytes.fromhex(data["digest"])) < 16:
        raise ValueError("hash salt and digest must be at least 16 bytes")
    return dict(data)


def _matches(hashed: dict[str, Any], secret: str) -> bool:
    digest = bytes.fromhex(hashed["digest"])
    computed = _scrypt(secret, bytes.fromhex(hashed["salt"]), hashed["n"], hashed["r"], hashed["p"], len(digest))
    return hmac.compare_digest(computed, digest)


def _maxmem(n: int, r: int, p: int) -> int:
    # What OpenSSL needs exactly; its default limit (32 MiB) would refuse n = 2**15 and above.
    return 128 * r * (n + p + 2)


def _scrypt(secret: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=_maxmem(n, r, p))


@dataclass(frozen=True)
class _Record:
    key: ApiKey
    hash: dict[str, Any]  # as stored: {"alg": "scrypt", "n", "r", "p", "salt", "digest"}


def _parse(raw: bytes) -> dict[str, _Record]:
    data = json.loads(raw)
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION or not isinstance(data.get("keys"), list):
        raise ValueError(f'expected {{"version": {FORMAT_VERSION}, "keys": [...]}}')
    records: dict[str, _Record] = {}
    for item in data["keys"]:
        key_id, revoked_at = item["key_id"], item["revoked_at"]
        if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id) or key_id in records:
            raise ValueError(f"bad or duplicate key id {key_id!r}")
        if not isinstance(item["tenant"], str) or not isinstance(item["name"], str):
            raise ValueError(f"key {key_id}: tenant and name must be strings")
        revoked = None if revoked_at is None else float(revoked_at)
        # Files written before grants existed have no such field: their keys hold none. A grant this version does
        # not know is kept (and so written back) but gives nothing: only known grant names are ever checked.
        grants = item.get("grants", [])
        if not isinstance(grants, list) or not all(isinstance(g, str) for g in grants):
            raise ValueError(f"key {key_id}: grants must be a list of strings")
        key = ApiKey(
            key_id,
            item["tenant"],
            Role(item["role"]),
            item["name"],
            float(item["created_at"]),
            revoked,
            tuple(sorted(set(grants))),
        )
        records[key_id] = _Record(key, _check_hash(item["hash"]))
    return records


def _role(value: Role | str) -> Role:
    try:
        return Role(value)
    except ValueError:
        shown = str(value)[:40]
        raise InvalidArgument.field("role", f"{shown!r} is not a role: use one of {', '.join(Role)}") from None


def _grants(values: Iterable[str]) -> tuple[str, ...]:
    if isinstance(values, str):  # one grant passed bare would otherwise be taken letter by letter
        values = (values,)
    checked = set()
    for value in values:
        if value not in GRANTS:
            shown = str(value)[:40]
            known = ", ".join(sorted(GRANTS))
            raise InvalidArgument.field("grants", f"{shown!r} is not a grant: use one of {known}")
        checked.add(value)
    return tuple(sorted(checked))


class KeyStore:
    """The API keys in one JSON file, shared by the mesh's services and edited by ``maas keys``.

    Safe to share between threads; several processes may hold one on the same file.
    """

    def __init__(self, path: Path, *, scrypt_n: int = 2**14) -> None:
        """Load the keys at ``path`` (missing: no keys); raises ValueError when it is not a key file."""
        self.path = Path(path)
        self._scrypt_n = scrypt_n
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int] | None = None
        self._records: dict[str, _Record] = {}
        # key id -> sha256 of the token last verified with scrypt: scrypt costs tens of ms, too much per call.
        self._cache: dict[str, bytes] = {}
        with self._lock:
            self._refresh()

    def create(self, tenant: str, role: Role | str, name: str, grants: Iterable[str] = ()) -> tuple[ApiKey, str]:
        """Add a key with ``grants`` (each one of GRANTS); returns it and its token (shown once; only the hash
        is stored)."""
        check_name(tenant, "tenant")
        checked_role = _role(role)
        check_name(name, "name")
        checked_grants = _grants(grants)
        secret = secrets.token_urlsafe(32)
        hashed = _new_hash(secret, self._scrypt_n)  # before taking the file lock: it is the slow part

        def add(records: dict[str, _Record]) -> ApiKey:
            if any(r.key.tenant == tenant and r.key.name == name and not r.key.revoked for r in records.values()):
                raise AlreadyExists(f"tenant {tenant!r} already has a live key named {name!r}")
            key_id = secrets.token_hex(6)
            while key_id in records:
                key_id = secrets.token_hex(6)
            key = ApiKey(key_id, tenant, checked_role, name, time.time(), grants=checked_grants)
            records[key_id] = _Record(key, hashed)
            return key

        key = self._mutate(add)
        return key, f"{TOKEN_PREFIX}{key.key_id}_{secret}"

    def list(self, tenant: str | None = None, *, include_revoked: bool = True) -> builtins.list[ApiKey]:
        """The keys (of ``tenant`` when given), oldest first."""
        keys = [r.key for r in self._current().values()]
        return [k for k in keys if (tenant is None or k.tenant == tenant) and (include_revoked or not k.revoked)]

    def get(self, key_id: str) -> ApiKey:
        """The key with id ``key_id``, revoked or not; raises NotFound."""
        record = self._current().get(key_id)
        if record is None:
            raise NotFound(f"no API key {key_id[:40]!r}")
        return record.key

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key for good (again: no change); returns it. Raises NotFound for an unknown id."""

        def mark(records: dict[str, _Record]) -> ApiKey:
            record = records.get(key_id)
            if record is None:
                raise NotFound(f"no API key {key_id[:40]!r}")
            if not record.key.revoked:
                record = replace(record, key=replace(record.key, revoked_at=time.time()))
                records[key_id] = record
            return record.key

        return self._mutate(mark)

    def verify(self, token: str) -> ApiKey | None:
        """The live (unrevoked) key the token belongs to, else None. Never raises for bad input."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
            return None
        match = _TOKEN.fullmatch(token)
        if match is None:
            return None
        key_id, secret = match.groups()
        presented = hashlib.sha256(token.encode()).digest()
        with self._lock:
            self._refresh()
            record = self._records.get(key_id)
            cached = self._cache.get(key_id)
        if record is None or record.key.revoked:
            return None
        if cached is not None and hmac.compare_digest(cached, presented):
            return record.key
        # A miss costs scrypt whether or not the key is cached, so guessing is never cheaper for cached keys.
        if not _matches(record.hash, secret):  # outside the lock: other callers need not wait tens of ms
            return None
        with self._lock:
            current = self._records.get(key_id)
            if current is None or current.key.revoked:  # revoked while we hashed
                return None
            self._cache[key_id] = presented
            return current.key

    def _current(self) -> dict[str, _Record]:
        # Safe to use unlocked: a reload replaces the dict, it never changes one in place.
        with self._lock:
            self._refresh()
            return self._records

    def _refresh(self) -> None:
        """Reload the file if it changed (one stat when it did not); the caller holds ``self._lock``."""
        try:
            st = os.stat(self.path)
            signature: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            signature = None
        if signature == self._signature:
            return
        self._signature, self._records = self._read()
        self._cache = {k: v for k, v in self._cache.items() if k in self._records and not self._records[k].key.revoked}

    def _read(self) -> tuple[tuple[int, int, int] | None, dict[str, _Record]]:
        # The signature comes from the open file itself, so it always describes the bytes that were read.
        try:
            with open(self.path, "rb") as handle:
                st = os.fstat(handle.fileno())
                raw = handle.read()
        except FileNotFoundError:
            return None, {}
        try:
            return (st.st_mtime_ns, st.st_size, st.st_ino), _parse(raw)
        except KeyError as exc:
            raise ValueError(f"{self.path}: not a maas key file: missing field {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{self.path}: not a maas key file: {exc}") from exc

    def _mutate(self, change: Callable[[dict[str, _Record]], _T]) -> _T:
        """Apply ``change`` to the file's current keys under an exclusive lock shared with other processes."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            old, records = self._read()  # re-read: another process may have written since we last looked
            before = dict(records)
            result = change(records)
            if records != before:
                keys = [
                    {**vars(r.key), "role": r.key.role.value, "grants": list(r.key.grants), "hash": r.hash}
                    for r in records.values()
                ]
                body = json.dumps({"version": FORMAT_VERSION, "keys": keys}, indent=2) + "\n"
                write_atomic(self.path, body.encode(), 0o600)
                # Readers compare (mtime, size, inode); an inode can be reused and two writes can share a clock
                # tick, so make mtimes strictly increase: then no version of the file can look like an older one.
                if old is not None and os.stat(self.path).st_mtime_ns <= old[0]:
                    os.utime(self.path, ns=(time.time_ns(), old[0] + 1))
        finally:
            os.close(lock_fd)  # closing releases the flock
        with self._lock:
            self._refresh()
        return result

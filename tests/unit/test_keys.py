"""API keys: tokens, hashing at rest, revocation seen by every reader, the verify cache, and bad input."""

from __future__ import annotations

import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from shared.errors import AlreadyExists, InvalidArgument, NotFound
from shared.security import keys as keys_module
from shared.security.keys import GRANT_PROTECTED_ALIASES, GRANTS, TOKEN_PREFIX, ApiKey, KeyStore, Role

FAST_N = 2**10  # scrypt's cost in tests; the default (2**14) would make each hash tens of ms


def _store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "auth" / "keys.json", scrypt_n=FAST_N)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_create_returns_a_token_that_verifies(tmp_path: Path) -> None:
    store = _store(tmp_path)
    key, token = store.create("team-a", Role.DEVELOPER, "ci")
    assert token.startswith(f"{TOKEN_PREFIX}{key.key_id}_")
    assert len(key.key_id) == 12 and int(key.key_id, 16) >= 0
    assert (key.tenant, key.role, key.name, key.revoked) == ("team-a", Role.DEVELOPER, "ci", False)
    assert store.verify(token) == key
    assert store.get(key.key_id) == key


def test_file_holds_only_hashes_and_is_private(tmp_path: Path) -> None:
    store = _store(tmp_path)
    key, token = store.create("team-a", "admin", "ops")
    secret = token.removeprefix(f"{TOKEN_PREFIX}{key.key_id}_")
    text = store.path.read_text()
    assert token not in text and secret not in text and secret[:16] not in text
    data = json.loads(text)
    assert data["version"] == 1
    [entry] = data["keys"]
    assert entry["key_id"] == key.key_id and entry["role"] == "admin" and entry["revoked_at"] is None
    assert entry["hash"]["alg"] == "scrypt" and entry["hash"]["n"] == FAST_N
    assert len(bytes.fromhex(entry["hash"]["salt"])) == 16 and len(bytes.fromhex(entry["hash"]["digest"])) == 32
    assert _mode(store.path) == 0o600
    assert _mode(store.path.parent) == 0o700
    assert [p.name for p in store.path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_each_key_has_its_own_salt(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.create("team-a", Role.INFERENCE, "one")
    store.create("team-a", Role.INFERENCE, "two")
    salts = {entry["hash"]["salt"] for entry in json.loads(store.path.read_text())["keys"]}
    assert len(salts) == 2


def test_wrong_secret_and_unknown_id_do_not_verify(tmp_path: Path) -> None:
    store = _store(tmp_path)
    key, token = store.create("team-a", Role.ADMIN, "ops")
    assert store.verify(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert store.verify(f"{TOKEN_PREFIX}{key.key_id}_wrong") is None
    other_id = "0" * 12 if key.key_id != "0" * 12 else "1" * 12
    assert store.verify(token.replace(key.key_id, other_id)) is None
    # A wrong secret after a cached success still fails.
    assert store.verify(token) == key
    assert store.verify(token[:-1] + ("A" if token[-1] != "A" else "B")) is None


@pytest.mark.parametrize(
    "token",
    [
        "",
        "maas_",
        "maas__x",
        "abc",
        "Bearer maas_0123456789ab_secret",
        "maas_0123456789ab_",
        "maas_0123456789AB_secret",  # the id is lower-case hex
        "maas_0123456789a_secret",
        "maas_0123456789abc_secret",
        "maas_zzzzzzzzzzzz_secret",
        "maas_0123456789ab_sec ret",
        "maas_0123456789ab_sécret",
        "maas_0123456789ab_secret\n",
        "maas_0123456789ab_secret\x00",
        "maas_0123456789ab_\ud800",
        "maas_0123456789ab_" + "a" * 10_000,
        "x" * 1_000_000,
    ],
)
def test_malformed_tokens_are_refused(tmp_path: Path, token: str) -> None:
    store = _store(tmp_path)
    store.create("team-a", Role.ADMIN, "ops")
    assert store.verify(token) is None


@pytest.mark.parametrize("garbage", [None, 0, b"maas_0123456789ab_secret", ["maas_"], object()])
def test_non_strings_are_refused(tmp_path: Path, garbage: Any) -> None:
    assert _store(tmp_path).verify(garbage) is None


def test_a_token_with_a_known_id_and_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    store = _store(tmp_path)
    key, token = store.create("team-a", Role.ADMIN, "ops")
    secret = token.rsplit("_", 1)[-1]
    for bad in (f"maas_{key.key_id}_{secret}=", f"maas_{key.key_id}_{secret}/", f"maas_{key.key_id.upper()}_{secret}"):
        assert store.verify(bad) is None


def test_revoke_stops_a_cached_token(tmp_path: Path) -> None:
    store = _store(tmp_path)
    key, token = store.create("team-a", Role.INFERENCE, "app")
    assert store.verify(token) == key  # now cached
    revoked = store.revoke(key.key_id)
    assert revoked.revoked and revoked.revoked_at is not None and revoked.key_id == key.key_id
    assert store.verify(token) is None
    assert store.get(key.key_id).revoked


def test_revoke_is_idempotent_and_unknown_ids_are_not_found(tmp_path: Path) -> None:
    store = _store(tmp_path)
    key, _ = store.create("team-a", Role.INFERENCE, "app")
    first = store.revoke(key.key_id)
    assert store.revoke(key.key_id) == first
    with pytest.raises(NotFound):
        store.revoke("0123456789ab")
    with pytest.raises(NotFound):
        store.get("0123456789ab")
    with pytest.raises(NotFound):
        _store(tmp_path / "empty").revoke("0123456789ab")


def test_another_instance_sees_a_revoke_on_its_next_verify(tmp_path: Path) -> None:
    writer = _store(tmp_path)
    key, token = writer.create("team-a", Role.DEVELOPER, "ci")
    reader = _store(tmp_path)
    assert reader.verify(token) == key
    # Same mtime and size as before: only the inode (new with each os.replace) can tell the files apart.
    before = reader.path.stat()
    writer.revoke(key.key_id)
    os.utime(reader.path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert reader.path.stat().st_ino != before.st_ino
    assert reader.verify(token) is None


def test_an_edit_of_the_same_size_and_mtime_is_seen(tmp_path: Path) -> None:
    # A file replaced by one of equal size within one clock tick: only the inode tells them apart.
    store = _store(tmp_path)
    key, token = store.create("team-a", Role.DEVELOPER, "ci")
    assert store.verify(token) == key
    before = store.path.stat()
    text = store.path.read_text()
    edited = text.replace('"revoked_at": null', '"revoked_at": 1234')
    assert edited != text and len(edited) == len(text)
    replacement = store.path.with_name("edited.json")
    replacement.write_text(edited)
    os.replace(replacement, store.path)
    os.utime(store.path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert store.path.stat().st_size == before.st_size
    assert store.verify(token) is None
    assert store.get(key.key_id).revoked_at == 1234


def test_an_unchanged_file_is_not_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path)
    key, token = store.create("team-a", Role.ADMIN, "ops")
    parses: list[int] = []
    real = keys_module._parse

    def counting(raw: bytes) -> Any:
        parses.append(1)
        return real(raw)

    monkeypatch.setattr(keys_module, "_parse", counting)
    for _ in range(5):
        assert store.verify(token) == key
    assert store.list() == [key]
    assert parses == []
    store.revoke(key.key_id)
    assert store.verify(token) is None
    assert len(parses) == 2  # the revoke's own re-read under the lock, then the reload of the new file


def test_another_instance_sees_new_keys(tmp_path: Path) -> None:
    reader = _store(tmp_path)
    writer = _store(tmp_path)
    assert reader.list() == []
    key, token = writer.create("team-a", Role.ADMIN, "ops")
    assert reader.verify(token) == key
    # Each create re-reads the file under its lock: a stale instance never drops another's keys.
    stale = KeyStore(reader.path, scrypt_n=FAST_N)
    writer.create("team-a", Role.ADMIN, "ops-2")
    stale.create("team-a", Role.ADMIN, "ops-3")
    assert [k.name for k in reader.list()] == ["ops", "ops-2", "ops-3"]


def test_list_filters_by_tenant_and_revocation(tmp_path: Path) -> None:
    store = _store(tmp_path)
    a1, _ = store.create("team-a", "developer", "one")
    a2, _ = store.create("team-a", "inference", "two")
    b1, _ = store.create("team-b", Role.ADMIN, "one")
    store.revoke(a2.key_id)
    assert [k.key_id for k in store.list()] == [a1.key_id, a2.key_id, b1.key_id]
    assert [k.key_id for k in store.list("team-a")] == [a1.key_id, a2.key_id]
    assert [k.key_id for k in store.list("team-a", include_revoked=False)] == [a1.key_id]
    assert [k.key_id for k in store.list(include_revoked=False)] == [a1.key_id, b1.key_id]
    assert store.list("team-c") == []
    assert all(isinstance(k, ApiKey) and isinstance(k.role, Role) for k in store.list())
    assert {k.role for k in store.list("team-a")} == {Role.DEVELOPER, Role.INFERENCE}


def test_duplicate_live_names_are_refused_within_a_tenant(tmp_path: Path) -> None:
    store = _store(tmp_path)
    key, _ = store.create("team-a", Role.ADMIN, "ops")
    with pytest.raises(AlreadyExists):
        store.create("team-a", Role.INFERENCE, "ops")
    store.create("team-b", Role.ADMIN, "ops")  # other tenant: fine
    store.revoke(key.key_id)
    store.create("team-a", Role.ADMIN, "ops")  # the old one is revoked: fine


@pytest.mark.parametrize(
    ("tenant", "role", "name", "field"),
    [
        ("team-a", "root", "ops", "role"),
        ("team-a", "Admin", "ops", "role"),
        ("team-a", "", "ops", "role"),
        ("Team A", Role.ADMIN, "ops", "tenant"),
        ("", Role.ADMIN, "ops", "tenant"),
        ("../x", Role.ADMIN, "ops", "tenant"),
        ("team-a", Role.ADMIN, "", "name"),
        ("team-a", Role.ADMIN, "my key", "name"),
    ],
)
def test_bad_arguments_are_invalid(tmp_path: Path, tenant: str, role: str, name: str, field: str) -> None:
    store = _store(tmp_path)
    with pytest.raises(InvalidArgument) as info:
        store.create(tenant, role, name)
    assert [v.field for v in info.value.violations] == [field]
    if field == "role":
        assert all(r.value in info.value.message for r in Role)
    assert not store.path.exists()


# Grants ---------------------------------------------------------------------------------------------------


def test_grants_are_persisted_and_seen_by_another_instance(tmp_path: Path) -> None:
    store = _store(tmp_path)
    granted, token = store.create("team-a", Role.DEVELOPER, "release", grants=[GRANT_PROTECTED_ALIASES])
    plain, plain_token = store.create("team-a", Role.DEVELOPER, "ci")
    assert granted.grants == (GRANT_PROTECTED_ALIASES,) and plain.grants == ()
    entries = {e["name"]: e for e in json.loads(store.path.read_text())["keys"]}
    assert entries["release"]["grants"] == [GRANT_PROTECTED_ALIASES] and entries["ci"]["grants"] == []

    other = KeyStore(store.path, scrypt_n=FAST_N)
    assert other.get(granted.key_id) == granted
    verified = other.verify(token)
    assert verified == granted and verified.grants == (GRANT_PROTECTED_ALIASES,)
    assert other.verify(plain_token) == plain
    # Grants survive the rewrites of the file by other changes.
    other.revoke(plain.key_id)
    assert KeyStore(store.path, scrypt_n=FAST_N).get(granted.key_id).grants == (GRANT_PROTECTED_ALIASES,)
    # A grant named twice is held once.
    twice, _ = store.create("team-b", Role.DEVELOPER, "release", grants=(GRANT_PROTECTED_ALIASES,) * 2)
    assert twice.grants == (GRANT_PROTECTED_ALIASES,)


def test_a_key_file_from_before_grants_loads_with_no_grants(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    writer = KeyStore(path, scrypt_n=FAST_N)
    key, token = writer.create("team-a", Role.DEVELOPER, "ci")
    data = json.loads(path.read_text())
    for entry in data["keys"]:
        del entry["grants"]  # as the files written before grants existed
    path.write_text(json.dumps(data))

    store = KeyStore(path, scrypt_n=FAST_N)
    assert store.verify(token) == key and store.get(key.key_id).grants == ()
    # Adding a key rewrites the file in the current format, keeping the old key as it was.
    store.create("team-a", Role.DEVELOPER, "release", grants=[GRANT_PROTECTED_ALIASES])
    data = json.loads(path.read_text())
    assert data["version"] == 1
    assert [(e["name"], e["grants"]) for e in data["keys"]] == [("ci", []), ("release", [GRANT_PROTECTED_ALIASES])]
    assert KeyStore(path, scrypt_n=FAST_N).verify(token) == key


@pytest.mark.parametrize("grants", [["admin"], ["protected-aliases", "everything"], ["Protected-Aliases"], [""]])
def test_unknown_grants_are_invalid(tmp_path: Path, grants: list[str]) -> None:
    store = _store(tmp_path)
    with pytest.raises(InvalidArgument) as info:
        store.create("team-a", Role.DEVELOPER, "release", grants=grants)
    assert [v.field for v in info.value.violations] == ["grants"]
    assert all(known in info.value.message for known in GRANTS)
    assert not store.path.exists()


def test_a_single_grant_given_as_a_string_is_one_grant(tmp_path: Path) -> None:
    key, _ = _store(tmp_path).create("team-a", Role.DEVELOPER, "release", grants=GRANT_PROTECTED_ALIASES)
    assert key.grants == (GRANT_PROTECTED_ALIASES,)


def test_role_ordering() -> None:
    assert Role.ADMIN.allows(Role.ADMIN) and Role.ADMIN.allows(Role.DEVELOPER) and Role.ADMIN.allows(Role.INFERENCE)
    assert Role.DEVELOPER.allows(Role.DEVELOPER) and Role.DEVELOPER.allows(Role.INFERENCE)
    assert not Role.DEVELOPER.allows(Role.ADMIN)
    assert Role.INFERENCE.allows(Role.INFERENCE)
    assert not Role.INFERENCE.allows(Role.DEVELOPER) and not Role.INFERENCE.allows(Role.ADMIN)
    assert Role("developer") is Role.DEVELOPER


def test_a_cached_verify_does_not_hash_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path)
    key, token = store.create("team-a", Role.ADMIN, "ops")
    calls: list[int] = []
    real = keys_module.hashlib.scrypt

    def counting(*args: Any, **kwargs: Any) -> bytes:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(keys_module.hashlib, "scrypt", counting)
    assert store.verify(token) == key
    assert len(calls) == 1
    for _ in range(5):
        assert store.verify(token) == key
    assert len(calls) == 1
    # An over-long token is refused before any hashing, even with a real key id.
    assert store.verify(f"{TOKEN_PREFIX}{key.key_id}_" + "a" * 300) is None
    assert len(calls) == 1
    # A wrong secret for a cached key is still checked with scrypt, never accepted from the cache.
    assert store.verify(f"{TOKEN_PREFIX}{key.key_id}_wrong") is None
    assert len(calls) == 2
    # A change of the file keeps cache entries of live keys.
    store.create("team-a", Role.ADMIN, "ops-2")
    calls.clear()
    assert store.verify(token) == key
    assert calls == []


def test_missing_file_means_no_keys(tmp_path: Path) -> None:
    store = _store(tmp_path)
    assert store.list() == []
    assert store.verify("maas_0123456789ab_secret") is None
    assert not store.path.exists()


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "",
        "[]",
        '{"version": 2, "keys": []}',
        '{"version": 1}',
        '{"version": 1, "keys": [{"key_id": "0123456789ab"}]}',
        '{"version": 1, "keys": [1]}',
    ],
)
def test_corrupt_file_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="not a maas key file"):
        KeyStore(path, scrypt_n=FAST_N)


def test_corrupt_entries_are_refused(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.create("team-a", Role.ADMIN, "ops")
    good = json.loads(store.path.read_text())
    edits: list[tuple[str, Any]] = [
        ("role", "root"),
        ("key_id", "../x"),
        ("created_at", "soon"),
        ("hash", {}),
        ("grants", GRANT_PROTECTED_ALIASES),  # a string, not a list: never read letter by letter
        ("grants", [1]),
    ]
    for field, value in edits:
        data = json.loads(json.dumps(good))
        data["keys"][0][field] = value
        store.path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match="not a maas key file"):
            KeyStore(store.path)
    data = json.loads(json.dumps(good))
    data["keys"][0]["hash"]["n"] = 1000  # not a power of two: scrypt would refuse it at verify time
    store.path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not a maas key file"):
        KeyStore(store.path)


def test_default_cost_still_verifies(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    key, token = store.create("team-a", Role.ADMIN, "ops")
    assert json.loads(store.path.read_text())["keys"][0]["hash"]["n"] == 2**14
    assert KeyStore(store.path, scrypt_n=FAST_N).verify(token) == key


def test_each_write_moves_mtime_forward(tmp_path: Path) -> None:
    # As if the previous write had happened in the same clock tick (or the clock went back): readers must still
    # see a new signature even if the new file got the old one's inode.
    store = _store(tmp_path)
    store.create("team-a", Role.ADMIN, "ops")
    ahead = store.path.stat().st_mtime_ns + 3600 * 10**9
    os.utime(store.path, ns=(ahead, ahead))
    store.create("team-a", Role.ADMIN, "ops-2")
    assert store.path.stat().st_mtime_ns > ahead


def test_concurrent_writers_lose_no_key(tmp_path: Path) -> None:
    path = tmp_path / "auth" / "keys.json"

    def create(i: int) -> str:
        return KeyStore(path, scrypt_n=FAST_N).create("team-a", Role.INFERENCE, f"key-{i}")[1]

    with ThreadPoolExecutor(8) as pool:
        tokens = list(pool.map(create, range(16)))
    store = KeyStore(path, scrypt_n=FAST_N)
    assert sorted(k.name for k in store.list()) == sorted(f"key-{i}" for i in range(16))
    with ThreadPoolExecutor(8) as pool:
        assert all(key is not None for key in pool.map(store.verify, tokens * 2))

"""Pure pieces of the foundation: names, paging, header collection, status mapping, retries, settings."""

from __future__ import annotations

import json
import struct

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from maas.registry.v1 import registry_pb2

from services.registry.core.ingest import MAX_HEADER_BYTES, HeaderCollector
from services.registry.settings import RegistrySettings
from shared import errors, names
from shared.grpc.channel import retry_service_config
from shared.grpc.status import from_rpc_error, to_status
from shared.paging import encode_token, parse_page
from shared.settings import settings_table


@pytest.mark.parametrize("good", ["a", "digits", "m-1.2_x", "9lives", "a" * 63])
def test_good_names(good: str) -> None:
    assert names.check_name(good) == good


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "A", "-a", ".a", "a" * 64, "é", "a b", "a\nb"])
def test_bad_names(bad: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        names.check_name(bad)
    assert info.value.violations[0].field == "name"


@given(st.text(max_size=80))
def test_a_name_that_passes_is_a_safe_path_component(text: str) -> None:
    try:
        names.check_name(text)
    except errors.InvalidArgument:
        return
    assert "/" not in text and not text.startswith(".") and text.isascii()


def test_version_numbers_are_ascii_digits_within_int64() -> None:
    from shared.names import MAX_INT64, version_number

    assert [version_number(t) for t in ("1", "42", str(MAX_INT64))] == [1, 42, MAX_INT64]
    # Other scripts' digits and superscripts are no numbers (int() would take some, reject others).
    assert [version_number(t) for t in ("", "prod", "\u0661\u0662", "²", "1.5", " 1")] == [None] * 6
    for bad in ("0", str(MAX_INT64 + 1), "9" * 4000):
        with pytest.raises(errors.InvalidArgument, match="version"):
            version_number(bad)


def test_aliases_exclude_numbers_and_latest() -> None:
    assert names.check_alias("production") == "production"
    for bad in ("3", "latest", "Prod", ""):
        with pytest.raises(errors.InvalidArgument):
            names.check_alias(bad)


def test_hostile_page_tokens_are_invalid_argument() -> None:
    import base64
    import json

    def token(payload: str) -> str:
        return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")

    nested = token("[" * 100_000 + "]" * 100_000)  # past the length cap
    deep_but_short = token("[" * 700 + "]" * 700)
    huge_int = token(json.dumps({"a": 10**30, "q": "x"}))
    many_digits = token('{"a": ' + "9" * 5000 + ', "q": "x"}')
    for bad in (nested, deep_but_short, huge_int, many_digits, "x" * 5000):
        with pytest.raises(errors.InvalidArgument, match="page_token"):
            parse_page(5, bad, {}, cursor_type=int)


def test_page_tokens_round_trip_and_bind_to_their_query() -> None:
    token = encode_token("m3", {"prefix": "m"})
    assert parse_page(5, token, {"prefix": "m"}).after == "m3"
    assert parse_page(0, "", {}).size == 50
    assert parse_page(10**6, "", {}).size == 1000
    for bad in ("garbage", "", encode_token(7, {"prefix": "m"})):
        if bad:
            with pytest.raises(errors.InvalidArgument, match="page_token"):
                parse_page(5, bad, {"prefix": "m"})
    with pytest.raises(errors.InvalidArgument, match="different filter"):
        parse_page(5, token, {"prefix": "n"})


@given(st.binary(max_size=200), st.integers(min_value=1, max_value=64))
def test_header_collector_keeps_exactly_the_header(payload: bytes, split: int) -> None:
    header = json.dumps({"__metadata__": {"k": "v"}}).encode()
    data = struct.pack("<Q", len(header)) + header + payload
    collector = HeaderCollector()
    for i in range(0, len(data), split):
        collector.feed(data[i : i + split])
    assert collector.data == data[: 8 + len(header)]


def test_header_collector_refuses_huge_headers() -> None:
    with pytest.raises(errors.InvalidArgument, match="exceeds"):
        HeaderCollector().feed(struct.pack("<Q", MAX_HEADER_BYTES + 1))


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, message: str, trailing: tuple) -> None:
        self._code, self._message, self._trailing = code, message, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> tuple:
        return self._trailing


@pytest.mark.parametrize(
    "error",
    [
        errors.InvalidArgument.field("name", "bad"),
        errors.NotFound("no such model", reason="MODEL_NOT_FOUND"),
        errors.ResourceExhausted("queue full", retry_after_s=0.5),
        errors.FailedPrecondition("held"),
        errors.AlreadyExists("dup"),
        errors.Unauthenticated("who?"),
        errors.PermissionDenied("no"),
        errors.Unavailable("down"),
    ],
)
def test_status_mapping_round_trips(error: errors.MaasError) -> None:
    code, message, trailing = to_status(error)
    back = from_rpc_error(_FakeRpcError(code, message, trailing))
    assert type(back) is type(error)
    assert back.message == error.message and back.reason == error.reason
    assert back.violations == error.violations
    assert back.retry_after_s == error.retry_after_s


def test_retries_follow_the_protos_idempotency_levels() -> None:
    service = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"]
    config = retry_service_config([service])
    retried = {n["method"] for e in config["methodConfig"] for n in e["name"]}
    assert {"GetModel", "ListModels", "GetVersion", "DownloadVersion", "SetAlias", "UpdateModel"} <= retried
    assert not retried & {"CreateModel", "DeleteModel", "UploadVersion", "DeriveVersion", "DeleteAlias"}
    assert config["methodConfig"][0]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


def test_settings_read_environment_and_are_documented(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("MAAS_REGISTRY_ADDRESS", "0.0.0.0:7100")
    monkeypatch.setenv("MAAS_INTERNAL_TOKEN", "t" * 40)
    config = tmp_path / "maas.toml"
    config.write_text('registry_max_artifact_bytes = 1234\nregistry_address = "ignored:1"\n')
    monkeypatch.setenv("MAAS_CONFIG_FILE", str(config))
    settings = RegistrySettings()
    assert settings.registry_address == "0.0.0.0:7100"  # the environment wins over the file
    assert settings.registry_max_artifact_bytes == 1234
    assert settings.internal_token == "t" * 40
    rows = settings_table(RegistrySettings)
    assert all(description for _, _, description in rows)
    assert "MAAS_REGISTRY_DATABASE_URL" in {name for name, _, _ in rows}


def test_unit_tests_cannot_start_ray() -> None:
    import ray

    with pytest.raises(RuntimeError, match="tests/integration"):
        ray.init(num_cpus=1, include_dashboard=False)

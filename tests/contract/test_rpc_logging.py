"""How loudly a real server logs what it answers: a client's lookup that finds nothing is routine (info), a
server's own failure is an error; and the lines go to a rotated JSON file when one is configured."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import structlog

from shared.errors import DataLoss, NotFound
from shared.grpc.server import start_server
from shared.logging import LOG_FILE_BACKUPS, configure_logging
from shared.settings import CommonSettings


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    """This process's logging sent to a small rotated file for the test, then put back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    # structlog's too: loggers cached before this test hold the session's processor list, and
    # structlog.testing.capture_logs (later tests) captures by changing the configured list in place.
    config = structlog.get_config()
    path = tmp_path / "logs" / "test.log"
    configure_logging("test", "info", "console", file=path, max_bytes=64 * 1024)
    yield path
    for handler in root.handlers:
        handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_client_errors_are_info_and_server_failures_error(log_file: Path) -> None:
    async def lookup(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise NotFound("model 'digits' not found", reason="MODEL_NOT_FOUND")

    async def corrupt(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise DataLoss("stored bytes failed their check")

    async def explode(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise RuntimeError("a bug")

    handler = grpc.method_handlers_generic_handler(
        "test.Logged",
        {
            "Lookup": grpc.unary_unary_rpc_method_handler(lookup),
            "Corrupt": grpc.unary_unary_rpc_method_handler(corrupt),
            "Explode": grpc.unary_unary_rpc_method_handler(explode),
        },
    )
    server = await start_server(
        CommonSettings(), "127.0.0.1:0", [lambda s: s.add_generic_rpc_handlers((handler,))], ["test.Logged"]
    )
    codes = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            for name in ("Lookup", "Corrupt", "Explode"):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await channel.unary_unary(f"/test.Logged/{name}")(b"", timeout=5)
                codes[name] = info.value.code()
    finally:
        await server.stop(0.2)
    assert codes == {
        "Lookup": grpc.StatusCode.NOT_FOUND,
        "Corrupt": grpc.StatusCode.DATA_LOSS,
        "Explode": grpc.StatusCode.INTERNAL,
    }
    lines = _lines(log_file)  # every line in the file is JSON, although the format asked was console
    by_method = {line.get("rpc_method"): line for line in lines if str(line["event"]).startswith("rpc_")}
    lookup_line = by_method["/test.Logged/Lookup"]
    assert (lookup_line["level"], lookup_line["code"], lookup_line["reason"]) == (
        "info",
        "NOT_FOUND",
        "MODEL_NOT_FOUND",
    )
    assert (by_method["/test.Logged/Corrupt"]["level"], by_method["/test.Logged/Corrupt"]["code"]) == (
        "error",
        "DATA_LOSS",
    )
    explode_line = by_method["/test.Logged/Explode"]
    assert (explode_line["event"], explode_line["level"]) == ("rpc_internal_error", "error")
    assert "RuntimeError: a bug" in str(explode_line["exception"]) and explode_line["trace_id"]
    loud = sorted(
        (str(line["event"]), str(line.get("code")))
        for line in lines
        if line["logger"] == "maas.rpc" and line["level"] != "info"
    )
    assert loud == [("rpc_error", "DATA_LOSS"), ("rpc_internal_error", "None")], loud


def test_a_log_file_is_rotated_at_its_size_cap(log_file: Path) -> None:
    log = logging.getLogger("maas.test")
    for i in range(2000):
        log.info("filler line %d %s", i, "x" * 100)
    rotated = sorted(log_file.parent.iterdir())
    assert [p.name for p in rotated] == ["test.log", *(f"test.log.{i}" for i in range(1, LOG_FILE_BACKUPS + 1))]
    assert all(p.stat().st_size <= 64 * 1024 for p in rotated)
    assert _lines(log_file)[-1]["event"] == "filler line 1999 " + "x" * 100

"""Where `maas up` sends its services' output (``services.cli.up_logs``), without starting them."""

from __future__ import annotations

from pathlib import Path

from services.cli.up_logs import ServiceLogs


def test_off_a_terminal_the_services_write_to_the_stream_in_the_format_asked(tmp_path: Path) -> None:
    # pytest's stderr is captured, not a terminal: auto keeps the stream, as json does.
    for fmt in ("auto", "json"):
        logs = ServiceLogs.choose(tmp_path, fmt)
        assert logs.directory is None and logs.open_output("registry") is None
        assert logs.env("registry") == {"MAAS_LOG_FORMAT": fmt}
        assert logs.last_words("registry") == "its log lines above say why"


def test_to_files_each_service_gets_its_log_file_and_its_output_file(tmp_path: Path) -> None:
    logs = ServiceLogs(tmp_path / "logs", "auto")
    assert logs.env("scheduler") == {"MAAS_LOG_FILE": str(tmp_path / "logs" / "scheduler.log")}
    output = logs.open_output("scheduler")
    assert output is not None
    with output:
        output.write(b"".join(b"line %d\n" % i for i in range(40)) + b"Traceback: the crash\n")
    words = logs.last_words("scheduler", lines=3)
    assert words == f"the end of {tmp_path}/logs/scheduler.out:\nline 38\nline 39\nTraceback: the crash"
    (tmp_path / "logs" / "gateway.log").write_text('{"event": "serving"}\n')
    empty = logs.open_output("gateway")  # nothing printed: the log's end is shown
    assert empty is not None
    empty.close()
    assert logs.last_words("gateway").endswith('gateway.log:\n{"event": "serving"}')
    assert logs.last_words("registry") == f"nothing in {tmp_path}/logs/registry.out or .log says why"

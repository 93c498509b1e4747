"""``maas up --quickstart`` as a user runs it: started, stopped and started again over one ``MAAS_HOME``.

Four starts of the real command (its own registry, scheduler with a local Ray, and gateway): the first
trains; each later one finds the trained model and its deployment. Between them the mesh is stopped with
SIGTERM, with SIGKILL of every process it had (stale Ray state, SQLite files, ports), and with SIGKILL of
``maas up`` alone (its services must not outlive it). Every start must end with predictions through the
gateway, and one more from this test.

The first start runs on a pseudo-terminal, as a person runs it: the terminal shows human lines only, the
services' JSON logs go to files under ``MAAS_HOME/logs``, and ``maas status`` reports the mesh healthy while
it runs and down (exit 1, no traceback) once it is stopped.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from inference import grpc_service_pb2 as kpb
from inference import grpc_service_pb2_grpc
from sklearn.datasets import load_digits

from services.cli.mesh_state import MARKER
from shared.processes import group_members, processes_with_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SERVING_LINE = "Ctrl-C stops the mesh."


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


MAAS = str(Path(sys.executable).with_name("maas"))
_ESCAPES = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][0-9A-Za-z])")


class Mesh:
    """One ``maas up --quickstart`` process, its output in a file; ``tty``: on a pseudo-terminal (200
    columns), whose output this test copies to the file."""

    def __init__(self, home: Path, env: dict[str, str], run: int, tty: bool = False) -> None:
        self.home = home
        self.log = home.parent / f"up-{run}.log"
        with self.log.open("wb") as out:
            if not tty:
                self.process = subprocess.Popen(
                    [MAAS, "up", "--quickstart"], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
                return
            terminal, child_end = os.openpty()
            fcntl.ioctl(child_end, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
            self.process = subprocess.Popen(
                [MAAS, "up", "--quickstart"],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=child_end,
                stderr=child_end,
                start_new_session=True,
            )
            os.close(child_end)
            threading.Thread(target=_copy_terminal, args=(terminal, self.log), daemon=True).start()

    def output(self) -> str:
        """What the terminal showed, without its escape sequences."""
        return _ESCAPES.sub("", self.log.read_text(errors="replace")).replace("\r\n", "\n")

    def wait_serving(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.output()
            if SERVING_LINE in text:
                return text
            if self.process.poll() is not None:
                pytest.fail(f"maas up exited with {self.process.returncode}:\n{_human(text)}")
            time.sleep(0.5)
        pytest.fail(f"maas up did not serve within {timeout_s} s:\n{_human(self.output())}")

    def groups(self) -> list[int]:
        return [int(g) for g in json.loads((self.home / "run" / "mesh.json").read_text())["groups"]]


def _copy_terminal(terminal: int, log: Path) -> None:
    with log.open("ab") as out:
        while True:
            try:
                data = os.read(terminal, 65536)
            except OSError:  # EIO: every writer of the terminal has closed it
                data = b""
            if not data:
                break
            out.write(data)
            out.flush()
    os.close(terminal)


def _human(text: str) -> str:
    """The lines a person reads (the services' JSON log lines left out), the last 60."""
    return "\n".join(line for line in text.splitlines() if not line.startswith("{"))[-6000:]


def _predict(address: str, home: Path) -> tuple[list[int], list[int]]:
    """Digits through the gateway as a user: TLS verified against the mesh's CA, the admin key `maas up`
    wrote to the credentials file."""
    credentials = json.loads((home / "credentials.json").read_text())
    assert (home / "credentials.json").stat().st_mode & 0o077 == 0
    digits = load_digits()
    images = (np.asarray(digits.images[:16], dtype=np.float32) / 16.0).reshape(16, 1, 8, 8)
    tls = grpc.ssl_channel_credentials(Path(credentials["ca_file"]).read_bytes())
    auth = (("authorization", f"Bearer {credentials['api_key']}"),)
    with grpc.secure_channel(address, tls) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as anonymous:
            stub.ServerReady(kpb.ServerReadyRequest(), timeout=10)
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.ServerReady(kpb.ServerReadyRequest(), metadata=auth, timeout=10).ready
        metadata = stub.ModelMetadata(kpb.ModelMetadataRequest(name="digits"), metadata=auth, timeout=30)
        request = kpb.ModelInferRequest(model_name="digits")
        request.inputs.add(name=metadata.inputs[0].name, datatype="FP32", shape=list(images.shape))
        request.raw_input_contents.append(images.tobytes())
        response = stub.ModelInfer(request, metadata=auth, timeout=30)
    with grpc.insecure_channel(address) as plain:
        with pytest.raises(grpc.RpcError) as refused:
            grpc_service_pb2_grpc.GRPCInferenceServiceStub(plain).ServerLive(kpb.ServerLiveRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    scores = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(tuple(response.outputs[0].shape))
    return scores.argmax(axis=1).tolist(), digits.target[:16].tolist()


def _assert_serves(mesh: Mesh, gateway: str, timeout_s: float) -> None:
    text = mesh.wait_serving(timeout_s)
    assert "predictions through the gateway" in text and "Traceback" not in text, _human(text)
    predicted, labels = _predict(gateway, mesh.home)
    assert sum(p == t for p, t in zip(predicted, labels, strict=True)) >= 14, (predicted, labels)


def _assert_tritonclient_serves(gateway: str, home: Path) -> None:
    """Triton's client, unchanged, with `ssl=True`, the mesh's CA and the key in `headers`."""
    credentials = json.loads((home / "credentials.json").read_text())
    script = Path(__file__).resolve().parents[1] / "contract" / "kserve_client" / "triton_tls.py"
    argv = ["--url", gateway, "--ca", credentials["ca_file"], "--key", credentials["api_key"], "--model", "digits"]
    done = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["anonymous"] == "StatusCode.UNAUTHENTICATED" and result["ready"] is True, result
    right = sum(p == t for p, t in zip(result["predicted"], result["labels"], strict=True))
    assert right >= 14, result


def _assert_loopback_only(groups: list[int]) -> None:
    """Every TCP listener of the mesh's processes (services, Ray, its actors) is on loopback (`ss -ltn`)."""
    pids = {pid for group in groups for pid in group_members(group)}
    listing = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    ours = [line for line in listing.splitlines() if any(f"pid={pid}," in line for pid in pids)]
    assert len(ours) >= 4, listing  # three services and Ray at least
    exposed = [line for line in ours if not line.split()[3].startswith(("127.", "[::ffff:127.", "[::1]"))]
    assert not exposed, "listeners beyond loopback:\n" + "\n".join(exposed)


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and _state(p) != "Z"]
        if not alive:
            return []
        time.sleep(0.2)
    return alive


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _status(env: dict[str, str]) -> tuple[int, str]:
    done = subprocess.run([MAAS, "status"], env=env, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout + done.stderr


def _json_lines(path: Path) -> list[dict[str, object]]:
    lines = path.read_text().splitlines()
    assert lines, f"{path} is empty"
    return [json.loads(line) for line in lines]  # every line is JSON


def _assert_quiet_terminal_and_log_files(mesh: Mesh, env: dict[str, str]) -> None:
    """The first start on a terminal: human lines there, JSON in the log files, `maas status` healthy."""
    text = mesh.output()
    assert not [line for line in text.splitlines() if line.lstrip().startswith("{")], _human(text)
    logs = mesh.home.resolve() / "logs"
    assert f"{logs}/<service>.log" in text and "ray/session_latest/logs" in text, text[-3000:]
    lines = {name: _json_lines(logs / f"{name}.log") for name in ("registry", "scheduler", "gateway")}
    for name, records in lines.items():
        assert any(r["event"] == "serving" and r["service"] == name for r in records), name
        # A first start is routine: nothing the services logged so far is a warning or an error.
        loud = [r for r in records if r["level"] not in ("debug", "info")]
        assert not loud, (name, loud)
    # The lookup that finds no trained model yet is there, at info.
    assert any(r.get("code") == "NOT_FOUND" and r["level"] == "info" for r in lines["registry"])
    code, shown = _status(env)
    assert code == 0, shown
    for name in ("registry", "scheduler", "gateway"):
        assert re.search(rf"^{name}\s+127\.0\.0\.1:\d+\s+serving\s*$", shown, re.M), shown
    assert re.search(r"^digits\s+digits@1\s+DEPLOYMENT_READY\s+1/1", shown, re.M), shown
    assert re.search(r"^job-\w+\s+default\s+SUCCEEDED\s+(\d+)/\1\s", shown, re.M), shown
    assert "pool (placed / capacity" in shown and "Traceback" not in shown


def _assert_status_reports_down(env: dict[str, str]) -> None:
    code, shown = _status(env)
    assert code == 1 and "Traceback" not in shown, shown
    for name in ("registry", "scheduler", "gateway"):
        assert re.search(rf"^{name}\s+127\.0\.0\.1:\d+\s+down", shown, re.M), shown


def test_up_starts_again_after_sigterm_and_after_sigkill(tmp_path: Path) -> None:
    home = tmp_path / "home"
    gateway = f"127.0.0.1:{_free_port()}"
    env = {
        **os.environ,
        "MAAS_HOME": str(home),
        "MAAS_REGISTRY_ADDRESS": f"127.0.0.1:{_free_port()}",
        "MAAS_SCHEDULER_ADDRESS": f"127.0.0.1:{_free_port()}",
        "MAAS_GATEWAY_ADDRESS": gateway,
        "MAAS_REGISTRY_METRICS_ADDRESS": "127.0.0.1:0",
        "MAAS_SCHEDULER_METRICS_ADDRESS": "127.0.0.1:0",
        "MAAS_GATEWAY_METRICS_ADDRESS": "127.0.0.1:0",
        "MAAS_LOG_FORMAT": "json",
        "MAAS_SHUTDOWN_GRACE_S": "3",
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("MAAS_INSECURE", None)  # the secure default: TLS, keys, a locked-down Ray
    mesh = None
    try:
        # 1: on a terminal, trains, deploys, serves; SIGTERM stops everything it started.
        on_terminal = {k: v for k, v in env.items() if k != "MAAS_LOG_FORMAT"}
        mesh = Mesh(home, on_terminal, 1, tty=True)
        _assert_serves(mesh, gateway, timeout_s=420)
        assert "training digits" in mesh.output()
        _assert_quiet_terminal_and_log_files(mesh, env)
        mesh.process.send_signal(signal.SIGTERM)
        assert mesh.process.wait(timeout=60) == 0
        assert not processes_with_env(MARKER, str(home.resolve()))
        _assert_status_reports_down(env)

        # 2: the same home again (the bug this test was written for), then SIGKILL of every process.
        mesh = Mesh(home, env, 2)
        _assert_serves(mesh, gateway, timeout_s=240)
        assert "training digits" not in mesh.output()
        groups = [mesh.process.pid, *mesh.groups()]
        _assert_loopback_only(groups)
        members = [pid for group in groups for pid in group_members(group)]
        for group in groups:
            os.killpg(group, signal.SIGKILL)
        assert not _wait_gone(members, 30)

        # 3: over what the killed mesh left; then SIGKILL of `maas up` alone: its services stop with it.
        mesh = Mesh(home, env, 3)
        _assert_serves(mesh, gateway, timeout_s=240)
        services = mesh.groups()
        mesh.process.kill()
        mesh.process.wait(timeout=10)
        assert not _wait_gone(services, 60), "services outlived a killed `maas up`"

        # 4: starts again, and a second `maas up` over the same home is refused in one line.
        mesh = Mesh(home, env, 4)
        _assert_serves(mesh, gateway, timeout_s=240)
        _assert_tritonclient_serves(gateway, home)
        second = subprocess.run([MAAS, "up"], env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert "another `maas up`" in second.stderr and "Traceback" not in second.stderr
        assert len([line for line in second.stderr.splitlines() if line.strip()]) == 1, second.stderr
        mesh.process.send_signal(signal.SIGTERM)
        assert mesh.process.wait(timeout=60) == 0
        assert not processes_with_env(MARKER, str(home.resolve()))
    finally:
        if mesh is not None and mesh.process.poll() is None:
            mesh.process.send_signal(signal.SIGTERM)
            try:
                mesh.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(mesh.process.pid, signal.SIGKILL)
        from shared.processes import end_processes_with_env

        end_processes_with_env(MARKER, str(home.resolve()))

"""What a client reads of a failure on the server: a stable reason and an id, never paths or stack text."""

from __future__ import annotations

from services.scheduler.adapters.ray_replicas import _reason
from shared.errors import FailedPrecondition


class _TaskError(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__("task failed")
        self.cause = cause


def test_a_replica_failure_shows_its_type_and_a_log_id_only() -> None:
    leaked = OSError("/var/lib/maas/cache/abc.safetensors: Permission denied\nTraceback (most recent call last)")
    message = _reason(_TaskError(leaked))
    assert message.startswith("OSError in the replica (scheduler log error_id=")
    assert "/var/lib" not in message and "Traceback" not in message


def test_a_domain_error_in_the_replica_keeps_its_message() -> None:
    assert _reason(_TaskError(FailedPrecondition("model 'm' has no version 3"))) == "model 'm' has no version 3"

"""The change feed on PostgreSQL: two writers that commit out of sequence order must not make a watcher
skip an event (a watcher that read number N+1 would never look below it again)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from services.registry.adapters.sql.repository import SqlRepository
from services.registry.adapters.sql.tables import MIGRATIONS
from services.registry.core.model import EventType
from shared.sql import create_engine, migrate
from tests.support.postgres import PostgresServer

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(60)]


def test_feed_numbers_follow_commit_order_with_two_writers(postgres: PostgresServer) -> None:
    engine = create_engine(postgres.create_database("feed_order"))
    migrate(engine, MIGRATIONS)
    repository = SqlRepository(engine)
    start = repository.last_sequence()
    first_model = SimpleNamespace(name="first", tenant="default")
    second_model = SimpleNamespace(name="second", tenant="default")
    second_done = threading.Event()

    def second_writer() -> None:
        with engine.begin() as conn:
            SqlRepository._event(conn, EventType.MODEL_CREATED, second_model)  # type: ignore[arg-type]
        second_done.set()

    with engine.begin() as conn:
        # The first writer has drawn its number and not committed yet...
        SqlRepository._event(conn, EventType.MODEL_CREATED, first_model)  # type: ignore[arg-type]
        writer = threading.Thread(target=second_writer)
        writer.start()
        time.sleep(0.5)
        # ...so the second cannot commit a later number before it: a watcher reading now sees neither.
        assert not second_done.is_set()
        assert repository.events_after(start, [], 10, tenant=None) == []
    writer.join(10)
    assert second_done.is_set()
    feed = repository.events_after(start, [], 10, tenant=None)
    assert [e.model for e in feed] == ["first", "second"]
    assert feed[0].sequence < feed[1].sequence
    engine.dispose()

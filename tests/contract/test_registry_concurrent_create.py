"""Uploads that create their model (``create_model``), racing on one new name: every one lands as a version
of the one model. Two training jobs with the same target model do this; on PostgreSQL the loser of the
model insert used to fail its upload with ALREADY_EXISTS (found by the scheduler crash test)."""

from __future__ import annotations

import threading

from services.registry.adapters.sql.repository import SqlRepository
from services.registry.adapters.sql.tables import MIGRATIONS
from services.registry.core.model import Lineage, NewVersion
from shared.sql import create_engine, migrate


def test_racing_uploads_that_create_one_model_all_land(database_url: str) -> None:
    engine = create_engine(database_url)
    migrate(engine, MIGRATIONS)
    repo = SqlRepository(engine)
    start = threading.Barrier(8)
    numbers: list[int] = []
    errors: list[BaseException] = []

    def upload(i: int) -> None:
        new = NewVersion(
            model="shared-target",
            sha256=f"{i:064x}",
            size_bytes=1,
            manifest_json="{}",
            architecture="mlp",
            framework="pytorch",
            dtype="float32",
            tags={},
            lineage=Lineage(),
        )
        start.wait()
        try:
            numbers.append(repo.add_version(new, True, tenant="team-a", owner="team-a").number)
        except BaseException as exc:
            errors.append(exc)

    for _ in range(3):  # a few rounds: the race is a window, not a certainty
        threads = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        start.reset()
    engine.dispose()
    assert errors == []
    assert sorted(numbers) == list(range(1, 25))

"""The registry's Repository on SQLAlchemy Core: SQLite and PostgreSQL through the same statements.

Tenancy is enforced in the statements themselves: a scoped caller's lookups filter on the model's tenant, in
the same transaction as the change, so a model of another tenant is never touched and is reported with the
very error a missing model gets.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from services.registry.adapters.sql.tables import (
    aliases,
    events,
    model_tags,
    models,
    signatures,
    trusted_keys,
    versions,
)
from services.registry.core.model import (
    Alias,
    Event,
    EventType,
    Lineage,
    Model,
    NewVersion,
    TrustedKey,
    Version,
    VersionSignature,
)
from services.registry.core.tenancy import ProtectedAliases, model_exists, model_not_found, name_taken, visible
from shared.errors import AlreadyExists, FailedPrecondition, NotFound
from shared.names import version_number


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything stored is UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# The advisory lock that orders the change feed's writers on PostgreSQL ("maasfeed" as an integer).
_FEED_LOCK = 0x6D61617366656564


class SqlRepository:
    """Implements ``core.ports.Repository``; each method is one transaction."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine

    # Internal helpers ---------------------------------------------------------------------------------

    def _read(self) -> sa.Connection:
        # Marked so that SQLite starts a plain deferred transaction, not a write-locking one.
        return self._engine.connect().execution_options(maas_readonly=True)

    @staticmethod
    def _model_row(conn: sa.Connection, name: str, tenant: str | None, *, lock: bool = False) -> sa.Row[Any]:
        query = sa.select(models).where(models.c.name == name)
        if tenant is not None:
            query = query.where(models.c.tenant == tenant)
        if lock:
            query = query.with_for_update()
        row = conn.execute(query).first()
        if row is None:
            raise model_not_found(name)
        return row

    @staticmethod
    def _event(conn: sa.Connection, type_: EventType, model: sa.Row[Any], version: int = 0, alias: str = "") -> None:
        if conn.dialect.name == "postgresql":
            # Sequence numbers are drawn at insert but become visible at commit: two writers could commit
            # out of order and a watcher that read the later number would skip the earlier one forever.
            # Held to commit, this lock makes the feed's writers take their numbers in commit order.
            # (SQLite has one writer at a time already.)
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _FEED_LOCK})
        conn.execute(
            events.insert().values(
                type=type_.value,
                model=model.name,
                tenant=model.tenant,
                version=version,
                alias=alias,
                created_at=_now(),
            )
        )

    @staticmethod
    def _to_model(conn: sa.Connection, row: sa.Row[Any]) -> Model:
        tags = dict(
            conn.execute(sa.select(model_tags.c.key, model_tags.c.value).where(model_tags.c.model_id == row.id)).all()
        )
        alias_map = dict(
            conn.execute(sa.select(aliases.c.name, aliases.c.version).where(aliases.c.model_id == row.id)).all()
        )
        return Model(
            name=row.name,
            tenant=row.tenant,
            description=row.description,
            tags=tags,
            latest_version=row.latest_version,
            aliases=alias_map,
            create_time=_utc(row.created_at),
            update_time=_utc(row.updated_at),
        )

    @staticmethod
    def _to_version(conn: sa.Connection, model: str, model_id: int, row: sa.Row[Any]) -> Version:
        names = conn.execute(
            sa.select(aliases.c.name)
            .where(aliases.c.model_id == model_id, aliases.c.version == row.number)
            .order_by(aliases.c.name)
        ).scalars()
        return Version(
            model=model,
            number=row.number,
            sha256=row.sha256,
            size_bytes=row.size_bytes,
            manifest_json=row.manifest_json,
            tags=dict(row.tags),
            lineage=Lineage(**row.lineage),
            aliases=tuple(names),
            create_time=_utc(row.created_at),
            signatures=tuple(
                VersionSignature(
                    key_id=sig.key_id,
                    sha256=sig.sha256,
                    bundle=sig.bundle.encode(),
                    public_key_pem=sig.public_key_pem.encode(),
                    create_time=_utc(sig.created_at),
                )
                for sig in conn.execute(
                    sa.select(signatures).where(signatures.c.version_id == row.id).order_by(signatures.c.created_at)
                ).all()
            ),
        )

    @staticmethod
    def _set_tags(conn: sa.Connection, model_id: int, tags: dict[str, str]) -> None:
        conn.execute(model_tags.delete().where(model_tags.c.model_id == model_id))
        if tags:
            conn.execute(model_tags.insert(), [{"model_id": model_id, "key": k, "value": v} for k, v in tags.items()])

    def _insert_model(
        self, conn: sa.Connection, name: str, description: str, tags: dict[str, str], owner: str
    ) -> sa.Row[Any]:
        now = _now()
        try:
            with conn.begin_nested():
                conn.execute(
                    models.insert().values(
                        name=name, tenant=owner, description=description, created_at=now, updated_at=now
                    )
                )
        except sa.exc.IntegrityError as exc:
            holder = conn.execute(sa.select(models.c.tenant).where(models.c.name == name)).scalar()
            raise (model_exists(name) if holder == owner else name_taken(name)) from exc
        row = self._model_row(conn, name, owner)
        self._set_tags(conn, row.id, tags)
        self._event(conn, EventType.MODEL_CREATED, row)
        return row

    # Models -------------------------------------------------------------------------------------------

    def create_model(self, name: str, description: str, tags: dict[str, str], *, owner: str) -> Model:
        with self._engine.begin() as conn:
            return self._to_model(conn, self._insert_model(conn, name, description, tags, owner))

    def get_model(self, name: str, *, tenant: str | None) -> Model:
        with self._read() as conn:
            return self._to_model(conn, self._model_row(conn, name, tenant))

    def model_owner(self, name: str) -> str | None:
        with self._read() as conn:
            owner: str | None = conn.execute(sa.select(models.c.tenant).where(models.c.name == name)).scalar()
            return owner

    def list_models(
        self, prefix: str, tags: dict[str, str], after: str | None, limit: int, *, tenant: str | None
    ) -> list[Model]:
        query = sa.select(models).order_by(models.c.name).limit(limit)
        if tenant is not None:
            query = query.where(models.c.tenant == tenant)
        if prefix:
            # Compared as a range, not LIKE, so '%' and '_' in a prefix match themselves.
            query = query.where(models.c.name >= prefix, models.c.name < prefix + "\U0010ffff")
        if after is not None:
            query = query.where(models.c.name > after)
        for key, value in tags.items():
            query = query.where(
                sa.exists().where(
                    model_tags.c.model_id == models.c.id, model_tags.c.key == key, model_tags.c.value == value
                )
            )
        with self._read() as conn:
            return [self._to_model(conn, row) for row in conn.execute(query).all()]

    def update_model(
        self, name: str, description: str | None, tags: dict[str, str] | None, *, tenant: str | None
    ) -> Model:
        with self._engine.begin() as conn:
            row = self._model_row(conn, name, tenant, lock=True)
            values: dict[str, Any] = {"updated_at": _now()}
            if description is not None:
                values["description"] = description
            conn.execute(models.update().where(models.c.id == row.id).values(**values))
            if tags is not None:
                self._set_tags(conn, row.id, tags)
            self._event(conn, EventType.MODEL_UPDATED, row)
            return self._to_model(conn, self._model_row(conn, name, tenant))

    def delete_model(self, name: str, force: bool, *, tenant: str | None, held_back: frozenset[str]) -> set[str]:
        with self._engine.begin() as conn:
            row = self._model_row(conn, name, tenant, lock=True)
            held = conn.execute(sa.select(aliases.c.name).where(aliases.c.model_id == row.id)).scalars().all()
            if force and (kept := sorted(held_back.intersection(held))):
                raise ProtectedAliases.denied(kept[0])
            if held and not force:
                raise FailedPrecondition(
                    f"model {name!r} has aliases ({', '.join(sorted(held))}); delete them first or set force",
                    reason="MODEL_HAS_ALIASES",
                )
            digests = set(conn.execute(sa.select(versions.c.sha256).where(versions.c.model_id == row.id)).scalars())
            for table in (aliases, versions, model_tags):
                conn.execute(table.delete().where(table.c.model_id == row.id))
            conn.execute(models.delete().where(models.c.id == row.id))
            self._event(conn, EventType.MODEL_DELETED, row)
            return digests

    # Versions -----------------------------------------------------------------------------------------

    def add_version(self, new: NewVersion, create_model: bool, *, tenant: str | None, owner: str) -> Version:
        with self._engine.begin() as conn:
            holder = conn.execute(sa.select(models.c.tenant).where(models.c.name == new.model)).scalar()
            if holder is None and create_model:
                try:
                    self._insert_model(conn, new.model, "", {}, owner)
                except AlreadyExists:
                    # A concurrent upload created it after our read (PostgreSQL reads committed rows; two jobs
                    # training one target model do this): add the version to it if the caller sees it.
                    holder = conn.execute(sa.select(models.c.tenant).where(models.c.name == new.model)).scalar()
                    if holder is None or not visible(holder, tenant):
                        raise
            elif holder is not None and create_model and not visible(holder, tenant):
                raise name_taken(new.model)
            # The row lock (PostgreSQL) or the write lock (SQLite) serialises allocation per model.
            row = self._model_row(conn, new.model, tenant, lock=True)
            number = row.latest_version + 1
            now = _now()
            conn.execute(models.update().where(models.c.id == row.id).values(latest_version=number, updated_at=now))
            conn.execute(
                versions.insert().values(
                    model_id=row.id,
                    number=number,
                    sha256=new.sha256,
                    size_bytes=new.size_bytes,
                    manifest_json=new.manifest_json,
                    architecture=new.architecture,
                    framework=new.framework,
                    dtype=new.dtype,
                    tags=new.tags,
                    lineage=dataclasses.asdict(new.lineage),
                    created_at=now,
                )
            )
            self._event(conn, EventType.VERSION_CREATED, row, version=number)
            return self._get_version(conn, new.model, number, tenant)

    @staticmethod
    def _version_row(conn: sa.Connection, model: str, model_id: int, number: int) -> sa.Row[Any]:
        row = conn.execute(
            sa.select(versions).where(versions.c.model_id == model_id, versions.c.number == number)
        ).first()
        if row is None:
            raise NotFound(f"model {model!r} has no version {number}", reason="VERSION_NOT_FOUND")
        return row

    def _get_version(self, conn: sa.Connection, model: str, number: int, tenant: str | None) -> Version:
        model_row = self._model_row(conn, model, tenant)
        return self._to_version(conn, model, model_row.id, self._version_row(conn, model, model_row.id, number))

    def get_version(self, model: str, number: int, *, tenant: str | None) -> Version:
        with self._read() as conn:
            return self._get_version(conn, model, number, tenant)

    def resolve(self, model: str, ref: str, *, tenant: str | None) -> int:
        with self._read() as conn:
            row = self._model_row(conn, model, tenant)
            if ref in ("", "latest"):
                if row.latest_version == 0:
                    raise NotFound(f"model {model!r} has no versions yet", reason="VERSION_NOT_FOUND")
                return int(row.latest_version)
            number = version_number(ref)
            if number is not None:
                return number
            aliased: int | None = conn.execute(
                sa.select(aliases.c.version).where(aliases.c.model_id == row.id, aliases.c.name == ref)
            ).scalar()
            if aliased is None:
                raise NotFound(f"model {model!r} has no alias {ref!r}", reason="ALIAS_NOT_FOUND")
            return int(aliased)

    def list_versions(self, model: str, after: int | None, limit: int, *, tenant: str | None) -> list[Version]:
        with self._read() as conn:
            row = self._model_row(conn, model, tenant)
            query = sa.select(versions).where(versions.c.model_id == row.id).order_by(versions.c.number).limit(limit)
            if after is not None:
                query = query.where(versions.c.number > after)
            return [self._to_version(conn, model, row.id, v) for v in conn.execute(query).all()]

    # Signatures and trust ------------------------------------------------------------------------------

    def add_signature(self, model: str, number: int, signature: VersionSignature, *, tenant: str | None) -> Version:
        with self._engine.begin() as conn:
            model_row = self._model_row(conn, model, tenant)
            row = self._version_row(conn, model, model_row.id, number)
            taken = conn.execute(
                sa.select(signatures.c.key_id).where(
                    signatures.c.version_id == row.id, signatures.c.key_id == signature.key_id
                )
            ).first()
            if taken is not None:
                raise AlreadyExists(
                    f"version {number} of {model!r} is already signed by key {signature.key_id[:16]}",
                    reason="ALREADY_SIGNED",
                )
            conn.execute(
                signatures.insert().values(
                    version_id=row.id,
                    key_id=signature.key_id,
                    sha256=signature.sha256,
                    bundle=signature.bundle.decode(),
                    public_key_pem=signature.public_key_pem.decode(),
                    created_at=signature.create_time,
                )
            )
            return self._to_version(conn, model, model_row.id, row)

    def trusted_keys(self, tenant: str) -> list[TrustedKey]:
        with self._read() as conn:
            rows = conn.execute(
                sa.select(trusted_keys).where(trusted_keys.c.tenant == tenant).order_by(trusted_keys.c.name)
            ).all()
        return [TrustedKey(r.tenant, r.name, r.key_id, r.public_key_pem.encode(), _utc(r.created_at)) for r in rows]

    def add_trusted_key(self, key: TrustedKey) -> TrustedKey:
        with self._engine.begin() as conn:
            taken = conn.execute(
                sa.select(trusted_keys.c.name).where(
                    trusted_keys.c.tenant == key.tenant, trusted_keys.c.name == key.name
                )
            ).first()
            if taken is not None:
                raise AlreadyExists(f"a trusted key named {key.name!r} exists; remove it first", reason="KEY_EXISTS")
            conn.execute(
                trusted_keys.insert().values(
                    tenant=key.tenant,
                    name=key.name,
                    key_id=key.key_id,
                    public_key_pem=key.public_key_pem.decode(),
                    created_at=key.create_time,
                )
            )
        return key

    def remove_trusted_key(self, tenant: str, name: str) -> None:
        with self._engine.begin() as conn:
            result = conn.execute(
                trusted_keys.delete().where(trusted_keys.c.tenant == tenant, trusted_keys.c.name == name)
            )
            if not result.rowcount:
                raise NotFound(f"no trusted key named {name!r}", reason="KEY_NOT_FOUND")

    # Aliases ------------------------------------------------------------------------------------------

    def set_alias(self, model: str, alias: str, version: int, create_only: bool, *, tenant: str | None) -> Alias:
        with self._engine.begin() as conn:
            row = self._model_row(conn, model, tenant, lock=True)
            found = conn.execute(
                sa.select(versions.c.id).where(versions.c.model_id == row.id, versions.c.number == version)
            ).first()
            if found is None:
                raise NotFound(f"model {model!r} has no version {version}", reason="VERSION_NOT_FOUND")
            now = _now()
            current = conn.execute(
                sa.select(aliases.c.version).where(aliases.c.model_id == row.id, aliases.c.name == alias)
            ).scalar()
            if current is not None and create_only:
                raise AlreadyExists(
                    f"alias {alias!r} of model {model!r} already exists (version {current})", reason="ALIAS_EXISTS"
                )
            updated = conn.execute(
                aliases.update()
                .where(aliases.c.model_id == row.id, aliases.c.name == alias)
                .values(version=version, updated_at=now)
            ).rowcount
            if not updated:
                conn.execute(aliases.insert().values(model_id=row.id, name=alias, version=version, updated_at=now))
            self._event(conn, EventType.ALIAS_SET, row, version=version, alias=alias)
            return Alias(model=model, name=alias, version=version, update_time=now)

    def delete_alias(self, model: str, alias: str, *, tenant: str | None) -> None:
        with self._engine.begin() as conn:
            row = self._model_row(conn, model, tenant, lock=True)
            deleted = conn.execute(
                aliases.delete().where(aliases.c.model_id == row.id, aliases.c.name == alias)
            ).rowcount
            if not deleted:
                raise NotFound(f"model {model!r} has no alias {alias!r}", reason="ALIAS_NOT_FOUND")
            self._event(conn, EventType.ALIAS_DELETED, row, alias=alias)

    def list_aliases(self, model: str, *, tenant: str | None) -> list[Alias]:
        with self._read() as conn:
            row = self._model_row(conn, model, tenant)
            rows = conn.execute(sa.select(aliases).where(aliases.c.model_id == row.id).order_by(aliases.c.name)).all()
            return [Alias(model=model, name=r.name, version=r.version, update_time=_utc(r.updated_at)) for r in rows]

    # Events and artifacts -----------------------------------------------------------------------------

    def events_after(self, sequence: int, models_: list[str], limit: int, *, tenant: str | None) -> list[Event]:
        query = sa.select(events).where(events.c.sequence > sequence).order_by(events.c.sequence).limit(limit)
        if models_:
            query = query.where(events.c.model.in_(models_))
        if tenant is not None:
            query = query.where(events.c.tenant == tenant)
        with self._read() as conn:
            return [
                Event(
                    sequence=r.sequence,
                    type=EventType(r.type),
                    model=r.model,
                    version=r.version,
                    alias=r.alias,
                    time=_utc(r.created_at),
                )
                for r in conn.execute(query).all()
            ]

    def last_sequence(self) -> int:
        with self._read() as conn:
            return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(events.c.sequence), 0))).scalar_one())

    def digest_in_use(self, sha256: str) -> bool:
        with self._read() as conn:
            return (
                conn.execute(sa.select(versions.c.id).where(versions.c.sha256 == sha256).limit(1)).first() is not None
            )

    def all_digests(self) -> set[str]:
        with self._read() as conn:
            return set(conn.execute(sa.select(versions.c.sha256).distinct()).scalars())

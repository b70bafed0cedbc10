"""Users' profiles in a database: every choice a user made, and the summary of the
posterior those choices give.

SQLite by default (a file, WAL mode: one writer at a time, readers never blocked), or any
SQLAlchemy URL, PostgreSQL (``postgresql+psycopg://user@host/db``) when the serving
replicas run on several nodes. Every replica reads and writes the same store; nothing about
a user lives only in a replica's memory.

A choice is appended in one transaction that also rewrites the user's summary from all of
the user's choices, the user's row locked first (``SELECT ... FOR UPDATE`` on PostgreSQL;
SQLite's ``BEGIN IMMEDIATE`` takes the database's write lock), so two choices arriving at
two replicas at once are both kept and the summary counts both.

The schema is versioned (``psoups_schema``): a new database is created at
:data:`SCHEMA_VERSION`; an older one is brought up by :data:`MIGRATIONS`, in order, in one
transaction; a newer one is refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Column,
    Engine,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

from psoups_ray.errors import PsoupsError

SCHEMA_VERSION = 1
MIGRATIONS: dict[int, Callable[[Any], None]] = {}
"""``{version: step}``: the step brings a database at ``version`` to ``version + 1``
(given a connection inside the migrating transaction)."""

metadata = MetaData()
schema = Table("psoups_schema", metadata, Column("version", Integer, nullable=False))
users = Table(
    "psoups_users",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("choices", Integer, nullable=False),
    Column("weights", Text, nullable=False),  # JSON {pole: weight}: the learned soup
    Column("uncertainty", Text, nullable=False),  # JSON {pole: posterior std}
)
choices = Table(
    "psoups_choices",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "user_id",
        String(128),
        ForeignKey(users.c.user_id, ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("prompt", Text, nullable=False),
    Column("chosen", Text, nullable=False),
    Column("rejected", Text, nullable=False),
    Column("chosen_features", Text, nullable=False),  # JSON {pole: φ_pole(prompt, chosen)}
    Column("rejected_features", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

WRITE_OPTION = "psoups_write"  # execution option of the transactions that write

# An advisory lock key for schema creation on PostgreSQL (replicas start together).
_SCHEMA_LOCK = 0x50534F5550


@dataclass(frozen=True)
class ChoiceRecord:
    prompt: str
    chosen: str
    rejected: str
    chosen_features: dict[str, float]  # {pole: normalised reward}: the answer's features
    rejected_features: dict[str, float]
    created_at: float


@dataclass(frozen=True)
class Summary:
    """What a user's choices give: the learned soup and the posterior's spread per pole."""

    weights: dict[str, float]
    uncertainty: dict[str, float]


@dataclass(frozen=True)
class Profile:
    user: str
    choices: int
    weights: dict[str, float]
    uncertainty: dict[str, float]
    created_at: float
    updated_at: float


def sqlite_url(path: str | Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


class ProfileStore:
    """Profiles in the database at ``url`` (created, or migrated, on first use)."""

    def __init__(self, url: str):
        self.url = url
        try:
            self.engine: Engine = create_engine(url, **_engine_options(url))
        except (ArgumentError, NoSuchModuleError) as exc:
            raise PsoupsError(
                f"personal.database: {url!r} is not a database URL SQLAlchemy can open ({exc}); "
                "use e.g. sqlite:////path/profiles.sqlite or postgresql+psycopg://user@host/db"
            ) from None
        except ModuleNotFoundError as exc:
            raise PsoupsError(
                f"personal.database: the driver for {url.split(':', 1)[0]} is not installed "
                f"({exc.name}); for PostgreSQL: pip install 'psoups_ray[postgres]'"
            ) from None
        if self.engine.dialect.name == "sqlite":
            _sqlite_transactions(self.engine)
        # Transactions that write: on SQLite they take the write lock when they begin.
        self._writer = self.engine.execution_options(**{WRITE_OPTION: True})
        try:
            self._migrate()
        except OperationalError as exc:
            raise PsoupsError(
                f"personal.database: cannot open {self._shown()}: {exc.orig}"
            ) from None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def _shown(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def _migrate(self) -> None:
        with self._writer.begin() as connection:
            if self.dialect == "postgresql":
                lock = text("SELECT pg_advisory_xact_lock(:key)")
                connection.execute(lock, {"key": _SCHEMA_LOCK})
            metadata.create_all(connection, tables=[schema])
            version = connection.execute(select(schema.c.version)).scalar()
            if version is None:
                metadata.create_all(connection)
                connection.execute(insert(schema).values(version=SCHEMA_VERSION))
                return
            if version > SCHEMA_VERSION:
                raise PsoupsError(
                    f"personal.database {self._shown()} has schema version {version}, newer "
                    f"than this psoups_ray's {SCHEMA_VERSION}: upgrade psoups_ray"
                )
            for step in range(version, SCHEMA_VERSION):
                MIGRATIONS[step](connection)
            if version < SCHEMA_VERSION:
                connection.execute(update(schema).values(version=SCHEMA_VERSION))

    def add_choice(
        self,
        user: str,
        record: ChoiceRecord,
        summarize: Callable[[list[ChoiceRecord]], Summary],
        keep: int | None = None,
    ) -> Profile:
        """Append ``record`` to ``user``'s choices (creating the user) and rewrite the
        user's summary with ``summarize`` (all of the user's choices, oldest first), in one
        transaction: both or neither are written. ``keep``: only the newest ``keep`` choices
        stay (older ones are deleted in the same transaction): a user's cost stays bounded,
        and the soup follows what the user prefers now."""
        now = time.time()
        with self._writer.begin() as connection:
            self._ensure_user(connection, user, now)
            row = connection.execute(
                select(users).where(users.c.user_id == user).with_for_update()
            ).one()
            connection.execute(
                insert(choices).values(
                    user_id=user,
                    prompt=record.prompt,
                    chosen=record.chosen,
                    rejected=record.rejected,
                    chosen_features=json.dumps(record.chosen_features),
                    rejected_features=json.dumps(record.rejected_features),
                    created_at=now,
                )
            )
            if keep is not None:
                newest = (
                    select(choices.c.id)
                    .where(choices.c.user_id == user)
                    .order_by(choices.c.id.desc())
                    .limit(keep)
                )
                connection.execute(
                    delete(choices).where(
                        choices.c.user_id == user, choices.c.id.not_in(newest.scalar_subquery())
                    )
                )
            history = self._choices(connection, user)
            summary = summarize(history)
            connection.execute(
                update(users)
                .where(users.c.user_id == user)
                .values(
                    choices=len(history),
                    weights=json.dumps(summary.weights),
                    uncertainty=json.dumps(summary.uncertainty),
                    updated_at=now,
                )
            )
        return Profile(
            user, len(history), summary.weights, summary.uncertainty, row.created_at, now
        )

    def _ensure_user(self, connection, user: str, now: float) -> None:
        values = dict(
            user_id=user, created_at=now, updated_at=now, choices=0, weights="{}", uncertainty="{}"
        )
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            statement = pg_insert(users).values(**values).on_conflict_do_nothing()
        elif self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            statement = sqlite_insert(users).values(**values).on_conflict_do_nothing()
        else:  # another database: insert unless there (the row lock serialises the rest)
            exists = connection.execute(select(users.c.user_id).where(users.c.user_id == user))
            if exists.first() is not None:
                return
            statement = insert(users).values(**values)
        connection.execute(statement)

    @staticmethod
    def _choices(connection, user: str) -> list[ChoiceRecord]:
        rows = connection.execute(
            select(choices).where(choices.c.user_id == user).order_by(choices.c.id)
        )
        return [
            ChoiceRecord(
                row.prompt,
                row.chosen,
                row.rejected,
                json.loads(row.chosen_features),
                json.loads(row.rejected_features),
                row.created_at,
            )
            for row in rows
        ]

    def profile(self, user: str) -> Profile | None:
        with self.engine.connect() as connection:
            row = connection.execute(select(users).where(users.c.user_id == user)).first()
        if row is None:
            return None
        return Profile(
            user,
            row.choices,
            json.loads(row.weights),
            json.loads(row.uncertainty),
            row.created_at,
            row.updated_at,
        )

    def choices(self, user: str) -> list[ChoiceRecord]:
        with self.engine.connect() as connection:
            return self._choices(connection, user)

    def delete(self, user: str) -> bool:
        """Remove every record of ``user``; False when there was none."""
        with self._writer.begin() as connection:
            connection.execute(delete(choices).where(choices.c.user_id == user))
            removed = connection.execute(delete(users).where(users.c.user_id == user)).rowcount
        return bool(removed)

    def count(self) -> dict[str, int]:
        with self.engine.connect() as connection:
            return {
                "users": connection.execute(select(func.count()).select_from(users)).scalar_one(),
                "choices": connection.execute(
                    select(func.count()).select_from(choices)
                ).scalar_one(),
            }

    def close(self) -> None:
        self.engine.dispose()


def _engine_options(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        # Replicas are processes, each with its own engine; a writer waits for another's
        # transaction (busy timeout) instead of failing at once.
        return {"connect_args": {"timeout": 30, "check_same_thread": False}}
    # The row lock in add_choice serialises one user's writers under READ COMMITTED (a
    # server configured for REPEATABLE READ would fail the second with a serialization
    # error instead).
    return {"pool_pre_ping": True, "isolation_level": "READ COMMITTED"}


def _sqlite_transactions(engine: Engine) -> None:
    """SQLite as a shared store: WAL journal (readers never wait), foreign keys enforced,
    and the transactions that write (:data:`WRITE_OPTION`) taking the write lock when they
    begin (``BEGIN IMMEDIATE``), so one that reads then writes never fails halfway on
    another writer (SQLAlchemy's recipe for pysqlite)."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection):
        writes = connection.get_execution_options().get(WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")

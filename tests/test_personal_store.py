"""The profile store against real databases: a SQLite file and a PostgreSQL server the
test starts. Choices are kept whole, concurrent writers lose nothing, a restart loses
nothing, a delete leaves nothing."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time

import pytest
from postgres import PostgresServer
from sqlalchemy import create_engine, text

from psoups_ray.errors import PsoupsError
from psoups_ray.personal.store import (
    SCHEMA_VERSION,
    ChoiceRecord,
    ProfileStore,
    Summary,
    sqlite_url,
)


@pytest.fixture(scope="module")
def postgres():
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "profiles.sqlite")
    server = request.getfixturevalue("postgres")
    database = f"test_{abs(hash(request.node.name)) % 10**8}"
    engine = create_engine(server.url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f"DROP DATABASE IF EXISTS {database}"))
        connection.execute(text(f"CREATE DATABASE {database}"))
    engine.dispose()
    return server.url.rsplit("/", 1)[0] + f"/{database}"


def _record(index: int) -> ChoiceRecord:
    return ChoiceRecord(
        f"prompt {index}", f"good {index}", f"bad {index}", [1.0, 0.5], [0.0, -0.5], 0
    )


def _count_summary(history: list[ChoiceRecord]) -> Summary:
    """A summary that shows which choices it saw."""
    return Summary({"P1A": float(len(history))}, {"P1A": 1.0 / len(history)})


def test_choices_summaries_restart_and_delete(url):
    store = ProfileStore(url)
    assert store.profile("alice") is None
    first = store.add_choice("alice", _record(0), _count_summary)
    assert (first.user, first.choices, first.weights) == ("alice", 1, {"P1A": 1.0})
    store.add_choice("bob", _record(9), _count_summary)
    profile = store.add_choice("alice", _record(1), _count_summary)
    assert profile.choices == 2 and profile.weights == {"P1A": 2.0}
    assert profile.uncertainty == {"P1A": 0.5} and profile.created_at == first.created_at
    store.close()

    again = ProfileStore(url)  # a restarted replica: the same profiles
    assert again.profile("alice").choices == 2 and again.profile("alice").weights == {"P1A": 2.0}
    history = again.choices("alice")
    assert [c.prompt for c in history] == ["prompt 0", "prompt 1"]
    assert history[1].chosen_features == [1.0, 0.5] and history[1].rejected == "bad 1"
    assert again.count() == {"users": 2, "choices": 3}

    assert again.delete("alice") is True
    assert again.profile("alice") is None and again.choices("alice") == []
    assert again.count() == {"users": 1, "choices": 1}  # bob's are untouched
    assert again.delete("alice") is False
    again.close()


def test_a_failed_summary_writes_nothing(url):
    store = ProfileStore(url)
    store.add_choice("carol", _record(0), _count_summary)

    def broken(history):
        raise RuntimeError("the posterior failed")

    with pytest.raises(RuntimeError, match="posterior failed"):
        store.add_choice("carol", _record(1), broken)
    with pytest.raises(RuntimeError):
        store.add_choice("dave", _record(2), broken)
    assert store.profile("carol").choices == 1 and len(store.choices("carol")) == 1
    assert store.profile("dave") is None and store.count() == {"users": 1, "choices": 1}
    store.close()


def _slow_count_summary(history: list[ChoiceRecord]) -> Summary:
    time.sleep(0.02)  # a posterior takes a while: widen the window another writer could use
    return _count_summary(history)


def _add_many(url: str, worker: int, count: int, start) -> None:
    store = ProfileStore(url)
    start.wait()  # every writer begins at once
    for index in range(count):
        store.add_choice("shared", _record(100 * worker + index), _slow_count_summary)
    store.close()


def test_replicas_writing_one_user_at_once_keep_every_choice(url):
    ProfileStore(url).close()  # the schema exists before the writers race
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(3)
    writers = [context.Process(target=_add_many, args=(url, w, 12, start)) for w in range(3)]
    for writer in writers:
        writer.start()
    try:
        for writer in writers:
            writer.join(timeout=180)
            assert writer.exitcode == 0
    finally:
        for writer in writers:
            if writer.is_alive():
                writer.kill()
    store = ProfileStore(url)
    profile = store.profile("shared")
    # Every choice is there, and the summary was computed from all of them.
    assert profile.choices == 36 and profile.weights == {"P1A": 36.0}
    assert len({c.prompt for c in store.choices("shared")}) == 36
    store.close()


def test_schema_versions_and_bad_urls(tmp_path):
    path = tmp_path / "profiles.sqlite"
    ProfileStore(sqlite_url(path)).close()
    connection = sqlite3.connect(path)
    assert connection.execute("SELECT version FROM psoups_schema").fetchall() == [(SCHEMA_VERSION,)]
    assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    connection.execute("UPDATE psoups_schema SET version = ?", (SCHEMA_VERSION + 1,))
    connection.commit()
    connection.close()
    with pytest.raises(PsoupsError, match="newer than this psoups_ray's"):
        ProfileStore(sqlite_url(path))
    with pytest.raises(PsoupsError, match="not a database URL"):
        ProfileStore("profiles.sqlite")
    with pytest.raises(PsoupsError, match="cannot open"):
        ProfileStore(sqlite_url(tmp_path / "missing" / "dir" / "profiles.sqlite"))
    with pytest.raises(PsoupsError, match="driver for nosuchdb is not installed|not a database"):
        ProfileStore("nosuchdb://localhost/x")


def test_sqlite_readers_never_wait_for_a_writer(tmp_path):
    path = tmp_path / "profiles.sqlite"
    store = ProfileStore(sqlite_url(path))
    store.add_choice("fay", _record(0), _count_summary)
    statements = []
    store.engine.pool.dispose()

    from sqlalchemy import event

    @event.listens_for(store.engine, "before_cursor_execute")
    def _seen(conn, cursor, statement, *args):
        statements.append(statement)

    writer = sqlite3.connect(path, timeout=0)
    writer.execute("BEGIN IMMEDIATE")  # another replica in the middle of a write
    try:
        assert store.profile("fay").choices == 1  # reads the committed state, no wait
        assert len(store.choices("fay")) == 1
    finally:
        writer.rollback()
        writer.close()
    store.add_choice("fay", _record(1), _count_summary)
    begins = [s for s in statements if s.startswith("BEGIN")]
    assert begins == ["BEGIN", "BEGIN", "BEGIN IMMEDIATE"], begins
    store.close()


def test_only_the_newest_choices_are_kept(url):
    store = ProfileStore(url)
    for index in range(5):
        profile = store.add_choice("gus", _record(index), _count_summary, keep=3)
    assert profile.choices == 3 and profile.weights == {"P1A": 3.0}
    assert [c.prompt for c in store.choices("gus")] == ["prompt 2", "prompt 3", "prompt 4"]
    store.add_choice("hal", _record(9), _count_summary, keep=3)
    assert store.count() == {"users": 2, "choices": 4}  # another user's are not touched
    store.close()

"""Scratch directories: removed on exit, and by the next one after their owner was killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from psoups_ray.scratch import LOCK_FILE, remove_abandoned, scratch_directory

HOLDER = textwrap.dedent(
    """
    import sys, time
    from psoups_ray.scratch import scratch_directory
    with scratch_directory("holder") as path:
        (path / "checkpoint.bin").write_bytes(b"x" * 1024)
        print(path, flush=True)
        time.sleep(600)
    """
)


def _start_holder(tmp_path):
    """A process that made a scratch directory under ``tmp_path`` and sleeps in it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    line = holder.stdout.readline().strip()
    assert line, "the holder process made no scratch directory"
    return holder, line


def test_removed_on_exit_and_on_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    with scratch_directory("reward-P1A") as path:
        assert path.parent == tmp_path and path.name.startswith("psoups-reward-P1A-")
        assert (path / LOCK_FILE).is_file()
        (path / "file").write_text("x")
    assert not path.exists()
    with pytest.raises(RuntimeError), scratch_directory("x") as failed:
        raise RuntimeError("boom")
    assert not failed.exists()


def test_a_killed_owners_directory_is_swept_a_live_ones_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    live, live_path = _start_holder(tmp_path)
    killed, killed_path = _start_holder(tmp_path)
    stranger = tmp_path / "psoups-not-ours"  # no lock file: made by something else
    stranger.mkdir()
    try:
        assert remove_abandoned(tmp_path) == []  # both owners alive
        os.kill(killed.pid, signal.SIGKILL)  # no finally, no atexit
        killed.wait(timeout=30)
        assert os.path.isdir(killed_path)

        with scratch_directory("next") as path:  # every new one sweeps first
            assert not os.path.exists(killed_path)
            assert os.path.isdir(live_path) and os.path.isfile(
                os.path.join(live_path, "checkpoint.bin")
            )
            assert stranger.is_dir()
        assert not path.exists()
    finally:
        live.kill()
        live.wait(timeout=30)
        killed.kill()
    assert [p.name for p in remove_abandoned(tmp_path)] == [os.path.basename(live_path)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["psoups-not-ours"]

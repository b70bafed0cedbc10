import errno
import json
import os
import re
import subprocess
import sys

import pyarrow.fs as pafs
import pytest

from psoups_ray.errors import PsoupsError, StorageError
from psoups_ray.manifest import MANIFEST_NAME, SCHEMA_VERSION, Manifest
from psoups_ray.rundir import RunDir, local_reference, resolve_artifact
from psoups_ray.runtime.adapters import CONFIG_FILE, WEIGHTS_FILE, read_lora_adapter


@pytest.fixture(params=["path", "uri"])
def rundir(request, tmp_path) -> RunDir:
    location = tmp_path / "run"
    return RunDir(str(location) if request.param == "path" else f"file://{location}")


def test_files_and_dirs_round_trip(rundir, tmp_path):
    rundir.write_json("a/b.json", {"x": 1})
    assert rundir.read_json("a/b.json") == {"x": 1}
    assert rundir.exists("a/b.json") and rundir.is_dir("a")
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.txt").write_text("v1")
    uri = rundir.upload_dir(src, "model")
    (src / "weights.txt").write_text("v2")
    rundir.upload_dir(src, "model")  # replaces
    assert (rundir.local_dir("model") / "weights.txt").read_text() == "v2"
    assert resolve_artifact(uri).joinpath("weights.txt").read_text() == "v2"
    assert not [p for p in os.listdir(rundir.path()) if ".tmp-" in p]


def test_uri_of_local_run_is_a_plain_path(tmp_path):
    assert RunDir(f"file://{tmp_path}/r").uri("base/model") == f"{tmp_path}/r/base/model"
    assert RunDir("relative/run").uri().startswith("/")


def test_atomic_write_keeps_old_content_when_the_write_crashes(rundir, monkeypatch):
    rundir.write_text("manifest.json", '{"old": true}')

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StorageError, match="cannot write .*manifest.json: disk full"):
        rundir.write_text("manifest.json", '{"new": true}')
    monkeypatch.undo()
    assert rundir.read_json("manifest.json") == {"old": True}
    assert not [p for p in os.listdir(rundir.path()) if p.startswith(".tmp-")]


def test_unwritable_run_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    rundir = RunDir(blocker / "run")  # its parent is a file: nothing can be created
    with pytest.raises(
        StorageError, match="cannot write .*Check that the run directory is writable"
    ):
        rundir.write_text("manifest.json", "{}")
    with pytest.raises(StorageError, match="cannot write directory"):
        rundir.upload_dir(tmp_path, "model")
    assert blocker.read_text() == "not a directory"


def test_missing_artifacts_name_the_path(rundir):
    with pytest.raises(StorageError, match=r"missing file .*nothing\.json"):
        rundir.read_text("nothing.json")
    with pytest.raises(StorageError, match=r"missing artifact directory .*base/model.*re-run"):
        rundir.local_dir("base/model")


def test_bad_uri_scheme():
    with pytest.raises(StorageError, match="cannot open run directory"):
        RunDir("nosuchscheme://bucket/x")


def test_manifest_create_load_and_stage_records(rundir):
    manifest = Manifest.open(rundir, {"name": "t"}, {"dimensions": []})
    data = rundir.read_json(MANIFEST_NAME)
    assert data["schema_version"] == SCHEMA_VERSION
    for key in ("base", "rewards", "policies", "baselines", "tuned_weights", "evaluation"):
        assert data[key] == {}
    manifest.start_stage("base", "fp1", {"base": {"x": 1}})
    assert rundir.read_json(MANIFEST_NAME)["stages"]["base"]["status"] == "running"
    manifest.complete_stage("base", {"model_path": "/m"}, seconds=1.234)
    again = Manifest.load(rundir)
    assert again.is_complete("base")
    assert again.data["base"]["model_path"] == "/m"
    assert again.data["stages"]["base"]["seconds"] == 1.23
    assert again.invalidate(["base", "rewards"]) == ["base"]
    assert not Manifest.load(rundir).is_complete("base")


def test_manifest_from_a_newer_version_or_garbage_is_refused(rundir):
    rundir.write_text(MANIFEST_NAME, json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(StorageError, match="reads versions up to"):
        Manifest.load(rundir)
    rundir.write_text(MANIFEST_NAME, "{half")
    with pytest.raises(StorageError, match="is not valid JSON"):
        Manifest.load(rundir)
    rundir.write_text(MANIFEST_NAME, "[]")
    with pytest.raises(StorageError, match="not a psoups_ray manifest"):
        Manifest.load(rundir)


def test_a_directory_without_a_manifest_is_named_as_not_a_run(tmp_path):
    with pytest.raises(StorageError, match="is not a psoups run directory .*psoups run --out"):
        Manifest.load(RunDir(tmp_path / "empty"))


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def leftovers(rundir: RunDir) -> list[str]:
    return [name for _, dirs, files in os.walk(rundir.path()) for name in dirs + files
            if ".tmp-" in name]  # fmt: skip


def test_a_full_disk_names_the_file_and_keeps_the_manifest(rundir, monkeypatch):
    manifest = Manifest.open(rundir, {"name": "t"}, {"dimensions": []})
    before = rundir.read_text(MANIFEST_NAME)
    monkeypatch.setattr(os, "fsync", no_space)  # where a full disk (or NFS quota) shows up
    with pytest.raises(StorageError) as info:
        manifest.start_stage("base", "fp1", {})
    monkeypatch.undo()
    message = str(info.value)
    assert f"cannot write {rundir.uri(MANIFEST_NAME)}: the disk is full" in message
    assert "its previous content is unchanged. Free space" in message
    assert rundir.read_text(MANIFEST_NAME) == before
    assert not leftovers(rundir)


def test_a_full_disk_during_a_directory_upload_keeps_the_old_copy(rundir, tmp_path, monkeypatch):
    source = tmp_path / "adapter"
    source.mkdir()
    (source / "weights.txt").write_text("v1")
    rundir.upload_dir(source, "policies/P1A")
    monkeypatch.setattr(pafs, "copy_files", no_space)
    with pytest.raises(StorageError, match=r"cannot write directory .*P1A: the disk is full"):
        rundir.upload_dir(source, "policies/P1A")
    monkeypatch.undo()
    assert (rundir.local_dir("policies/P1A") / "weights.txt").read_text() == "v1"
    assert not leftovers(rundir)


FILE_SIZE_LIMITED_WRITE = """
import resource, signal, sys
from psoups_ray.errors import StorageError
from psoups_ray.rundir import RunDir

rundir = RunDir(sys.argv[1])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    rundir.write_text("manifest.json", "x" * 100_000)
except StorageError as exc:
    print(exc)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="needs RLIMIT_FSIZE")
def test_a_real_file_size_limit_is_a_storage_error_and_keeps_the_old_file(tmp_path):
    rundir = RunDir(tmp_path / "run")
    rundir.write_text(MANIFEST_NAME, '{"old": true}')
    result = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMITED_WRITE, rundir.location],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"cannot write {rundir.uri(MANIFEST_NAME)}: the file is larger than" in result.stdout
    assert rundir.read_json(MANIFEST_NAME) == {"old": True}
    assert not leftovers(rundir)


def make_adapter(directory) -> str:
    """A directory shaped like a PEFT adapter (content is not read by these tests)."""
    directory.mkdir(parents=True)
    (directory / CONFIG_FILE).write_text('{"peft_type": "LORA"}')
    (directory / WEIGHTS_FILE).write_bytes(b"")
    return str(directory)


@pytest.fixture
def run_with_policy(tmp_path) -> tuple[RunDir, str]:
    """A run whose manifest names a policy adapter directory."""
    rundir = RunDir(tmp_path / "run")
    manifest = Manifest.open(rundir, {"name": "t"}, {"dimensions": []})
    location = make_adapter(tmp_path / "run" / "policies" / "P1A")
    manifest.data["policies"] = {"P1A": {"path": location}}
    manifest.save()
    return rundir, location


def test_an_artifact_deleted_behind_the_manifest_is_named_with_the_fix(run_with_policy):
    rundir, location = run_with_policy
    assert local_reference(location) == location
    for path in (f"{location}/{WEIGHTS_FILE}", f"{location}/{CONFIG_FILE}"):
        os.unlink(path)
        missing = f"missing adapter file {re.escape(path)}: .*--force"
        with pytest.raises(StorageError, match=missing):
            read_lora_adapter(location)
    os.rmdir(location)
    recorded = Manifest.load(rundir).data["policies"]["P1A"]["path"]
    for load in (local_reference, resolve_artifact, read_lora_adapter):
        with pytest.raises(StorageError) as info:
            load(recorded)
        message = str(info.value)
        assert f"missing {'adapter directory' if load is read_lora_adapter else 'artifact'}" in (
            message
        )
        assert location in message and "Restore it, or re-run the stage" in message
    with pytest.raises(StorageError, match=r"missing artifact directory .*P1A.*--force"):
        resolve_artifact(f"file://{location}")


def test_hub_ids_and_relative_paths_pass_through_unchecked():
    assert local_reference("allenai/tulu-2-7b") == "allenai/tulu-2-7b"
    assert local_reference("models/local-copy") == "models/local-copy"


def test_a_damaged_adapter_says_so_and_what_to_do(run_with_policy):
    _, location = run_with_policy
    with pytest.raises(PsoupsError, match=r"adapter_model.safetensors is damaged .*--force"):
        read_lora_adapter(location)
    with open(f"{location}/{CONFIG_FILE}", "w") as handle:
        handle.write("{half")
    with pytest.raises(PsoupsError, match=r"adapter_config.json is damaged \(not valid JSON"):
        read_lora_adapter(location)


def test_a_remote_runs_download_cache_follows_a_redone_artifact(tmp_path, monkeypatch):
    """On an object store a directory artifact is downloaded once per upload: a redone
    stage's new copy is a new download, never the stale one (the cache is keyed by the
    upload's generation, not by location alone)."""
    monkeypatch.setenv("PSOUPS_CACHE_DIR", str(tmp_path / "cache"))
    rundir = RunDir("mock:///runs/exp")  # pyarrow's in-memory file system: not local
    assert not rundir.is_local
    source = tmp_path / "adapter"
    source.mkdir()
    (source / "weights.txt").write_text("v1")
    rundir.upload_dir(source, "policies/P1A")
    first = rundir.local_dir("policies/P1A")
    assert (first / "weights.txt").read_text() == "v1"
    assert rundir.local_dir("policies/P1A") == first  # cached: not downloaded again
    (source / "weights.txt").write_text("v2")  # the same size: a location-keyed cache or
    rundir.upload_dir(source, "policies/P1A")  # one of sizes would serve v1
    second = rundir.local_dir("policies/P1A")
    assert second != first and (second / "weights.txt").read_text() == "v2"


def test_files_honour_the_umask(rundir, tmp_path):
    """Atomic writes start from mkstemp's 0600; the run's files end as the umask says, so
    teammates on a shared file system can read a run."""
    previous = os.umask(0o022)
    try:
        rundir.write_json("a/b.json", {"x": 1})
        source = tmp_path / "adapter"
        (source / "inner").mkdir(parents=True)
        (source / "inner" / "w.bin").write_bytes(b"1")
        os.chmod(source, 0o700)  # as a scratch directory is
        rundir.upload_dir(source, "policies/P1A")
        os.umask(0o027)
        rundir.write_text("c.txt", "group-readable")
    finally:
        os.umask(previous)
    root = rundir.path()
    assert oct(os.stat(f"{root}/a/b.json").st_mode & 0o777) == oct(0o644)
    assert oct(os.stat(f"{root}/a").st_mode & 0o777) == oct(0o755)
    assert oct(os.stat(f"{root}/policies/P1A/inner/w.bin").st_mode & 0o777) == oct(0o644)
    assert oct(os.stat(f"{root}/policies/P1A/inner").st_mode & 0o777) == oct(0o755)
    assert oct(os.stat(f"{root}/c.txt").st_mode & 0o777) == oct(0o640)

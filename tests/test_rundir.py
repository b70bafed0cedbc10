import json
import os

import pytest

from psoups_ray.errors import StorageError
from psoups_ray.manifest import MANIFEST_NAME, SCHEMA_VERSION, Manifest
from psoups_ray.rundir import RunDir, resolve_artifact


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

"""The run directory: one experiment's artifacts on a local path or a ``pyarrow.fs`` URI.

Every stage reads and writes through :class:`RunDir`, so the same code runs
on a laptop (``./runs/x``), a shared file system (``file:///mnt/runs/x``) or an
object store (``s3://bucket/runs/x``, ``gs://...``) — the same storage Ray
Train checkpoints to. Nothing here depends on a node's local disk except the
download cache used to hand artifacts to libraries that need local files.

Writes are atomic: a file is written to a temporary name and renamed (local
and mounted file systems), or uploaded as one object (object stores, where a
``PUT`` is all-or-nothing). A directory artifact is uploaded next to its
final name and moved into place; the manifest, updated last, is the commit
point: an artifact counts only once the manifest names it.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from psoups_ray.errors import StorageError

CACHE_ENV = "PSOUPS_CACHE_DIR"
RUN_RELATIVE = "./"
"""Prefix of a manifest location relative to its run directory."""
GENERATION_FILE = ".psoups-generation"
"""In every directory artifact :meth:`RunDir.upload_dir` writes: a fresh id per upload, which
keys the download cache of a remote run (a redone stage's new copy is a new key)."""


def _cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "psoups_ray"))


class RunDir:
    """A run directory addressed by a local path or a URI understood by ``pyarrow.fs``."""

    def __init__(self, location: str | os.PathLike[str]):
        location = os.fspath(location)
        if not location:
            raise StorageError("the run directory location is empty; pass --out PATH_OR_URI")
        if "://" not in location:
            location = os.path.abspath(os.path.expanduser(location))
        try:
            self.fs, root = pafs.FileSystem.from_uri(location)
        except (pa.ArrowInvalid, OSError, ValueError) as exc:
            raise StorageError(
                f"cannot open run directory {location!r}: {exc}. Use a local path or a URI "
                "such as file:///abs/path, s3://bucket/prefix or gs://bucket/prefix"
            ) from None
        self.root = root.rstrip("/") or "/"
        self.location = location
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"RunDir({self.location!r})"

    # -- addressing -----------------------------------------------------------------
    def path(self, relpath: str = "") -> str:
        """File-system path (inside ``self.fs``) of ``relpath``."""
        relpath = relpath.strip("/")
        return f"{self.root}/{relpath}" if relpath else self.root

    def uri(self, relpath: str = "") -> str:
        """Where ``relpath`` lives, as a plain path for local storage, else a URI.

        Recorded in the manifest: a local model directory loads directly with
        ``from_pretrained``; remote ones go through :meth:`local_dir`.
        """
        if self.is_local:
            return self.path(relpath)
        scheme = self.location.split("://", 1)[0]
        return f"{scheme}://{self.path(relpath).lstrip('/')}"

    def locate(self, relpath: str) -> str:
        """The location to record in the manifest for ``relpath``: relative to the run
        directory (``./<relpath>``), so the run reads the same wherever it is copied or
        moved; :meth:`resolve` turns it back into a path or URI."""
        return RUN_RELATIVE + relpath.strip("/")

    def resolve(self, location: str) -> str:
        """Where a recorded location is now: a run-relative one (:meth:`locate`) under this
        run directory; anything else (a hub id, a user's file, an older run's absolute
        location) as it is."""
        if location.startswith(RUN_RELATIVE):
            return self.uri(location[len(RUN_RELATIVE) :])
        return location

    def relpath_of(self, uri_or_path: str) -> str | None:
        """The run-relative path of a location this run directory produced, else None."""
        if uri_or_path.startswith(RUN_RELATIVE):
            return uri_or_path[len(RUN_RELATIVE) :]
        root_uri = self.uri()
        if uri_or_path == root_uri:
            return ""
        prefix = root_uri.rstrip("/") + "/"
        return uri_or_path[len(prefix) :] if uri_or_path.startswith(prefix) else None

    # -- queries --------------------------------------------------------------------
    def exists(self, relpath: str) -> bool:
        info = self._info(relpath)
        return info.type != pafs.FileType.NotFound

    def is_dir(self, relpath: str) -> bool:
        return self._info(relpath).type == pafs.FileType.Directory

    def _info(self, relpath: str) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path(relpath))
        except OSError as exc:
            raise StorageError(f"cannot stat {self.uri(relpath)}: {exc}") from None

    # -- files ----------------------------------------------------------------------
    def read_bytes(self, relpath: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(relpath)) as stream:
                return stream.read()
        except FileNotFoundError:
            raise StorageError(f"missing file {self.uri(relpath)}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {self.uri(relpath)}: {exc}") from None

    def read_text(self, relpath: str) -> str:
        return self.read_bytes(relpath).decode("utf-8")

    def read_json(self, relpath: str) -> Any:
        text = self.read_text(relpath)
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise StorageError(f"{self.uri(relpath)} is not valid JSON: {exc}") from None

    def write_bytes(self, relpath: str, data: bytes) -> None:
        """Write a file atomically: readers see the old content or the new, never a part."""
        target = self.path(relpath)
        parent = target.rsplit("/", 1)[0]
        try:
            self.fs.create_dir(parent, recursive=True)
            if self.is_local:
                fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-", suffix=".part")
                try:
                    with os.fdopen(fd, "wb") as handle:
                        handle.write(data)
                        handle.flush()
                        os.fsync(handle.fileno())
                    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600: teammates read
                    os.replace(tmp, target)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            else:  # object stores publish an object only once its upload completes
                with self.fs.open_output_stream(target) as stream:
                    stream.write(data)
        except OSError as exc:
            unchanged = "its previous content is unchanged"
            raise _write_error(self.uri(relpath), exc, unchanged) from None

    def write_text(self, relpath: str, text: str) -> None:
        self.write_bytes(relpath, text.encode("utf-8"))

    def write_json(self, relpath: str, obj: Any) -> None:
        self.write_text(relpath, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def write_csv(self, relpath: str, rows: list[dict[str, Any]]) -> None:
        """Rows as CSV; the columns are every key in first-seen order (missing cells empty)."""
        columns = list(dict.fromkeys(key for row in rows for key in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        self.write_text(relpath, buffer.getvalue())

    # -- directories ----------------------------------------------------------------
    def upload_dir(self, local_dir: str | os.PathLike[str], relpath: str) -> str:
        """Copy a local directory to ``relpath``, replacing what was there; returns its uri.

        The copy lands under a temporary sibling first and is then moved into place.
        """
        target = self.path(relpath)
        staging = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            self.fs.create_dir(staging, recursive=True)
            pafs.copy_files(
                os.fspath(local_dir),
                staging,
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=self.fs,
            )
            with self.fs.open_output_stream(f"{staging}/{GENERATION_FILE}") as stream:
                stream.write(uuid.uuid4().hex.encode())
            if self.fs.get_file_info(target).type != pafs.FileType.NotFound:
                self.fs.delete_dir(target)
            self.fs.move(staging, target)
        except OSError as exc:
            try:
                self.fs.delete_dir(staging)
            except OSError:
                pass
            raise _write_error(
                f"directory {self.uri(relpath)}", exc, "the partial copy was removed"
            ) from None
        return self.uri(relpath)

    def delete(self, relpath: str) -> None:
        info = self._info(relpath)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(relpath))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(relpath))

    def local_dir(self, relpath: str) -> Path:
        """A local directory holding ``relpath``: the directory itself on local storage,
        else a cached download, keyed by location and generation (:data:`GENERATION_FILE`,
        or for a directory uploaded otherwise its files' sizes and modification times), so
        a redone stage's new copy is downloaded again, never served stale."""
        if not self.is_dir(relpath):
            raise missing_artifact(self.uri(relpath), "artifact directory")
        if self.is_local:
            return Path(self.path(relpath))
        key = hashlib.sha256(
            f"{self.uri(relpath)}\n{self._generation(relpath)}".encode()
        ).hexdigest()[:16]
        cached = _cache_root() / key
        if not cached.exists():
            _cache_root().mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=_cache_root(), prefix=".download-"))
            pafs.copy_files(
                self.path(relpath),
                str(staging),
                source_filesystem=self.fs,
                destination_filesystem=pafs.LocalFileSystem(),
            )
            try:
                staging.rename(cached)
            except OSError:  # another process won the race
                shutil.rmtree(staging, ignore_errors=True)
        return cached

    def _generation(self, relpath: str) -> str:
        marker = f"{relpath.rstrip('/')}/{GENERATION_FILE}"
        if self.exists(marker):
            return self.read_text(marker)
        selector = pafs.FileSelector(self.path(relpath), recursive=True)
        files = sorted(
            (info.path, info.size, info.mtime_ns)
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.File
        )
        return json.dumps(files)


def current_umask() -> int:
    """This process's umask (read without changing it where Linux tells it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, and put it back
    os.umask(mask)
    return mask


_OUT_OF_SPACE = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file is larger than the file-size limit (ulimit -f) allows",
}


def _write_error(what: str, exc: OSError, unchanged: str) -> StorageError:
    """A failed write: where, why, what to do; running out of space is named as such."""
    if exc.errno in _OUT_OF_SPACE:
        return StorageError(
            f"cannot write {what}: {_OUT_OF_SPACE[exc.errno]} ({exc.strerror or exc}); "
            f"{unchanged}. Free space, or raise the quota or limit, and run the same command "
            "again (finished stages are kept), or use another --out"
        )
    return StorageError(
        f"cannot write {what}: {exc}. Check that the run directory is writable and has free "
        f"space; {unchanged}"
    )


def missing_artifact(location: str, what: str = "artifact") -> StorageError:
    """The error for an artifact the run's manifest names but storage no longer holds."""
    return StorageError(
        f"missing {what} {location}: the run's manifest records it, but it is gone. Restore "
        "it, or re-run the stage that produces it with --force (psoups run --stages STAGE "
        "--force --out RUN)"
    )


def resolve_artifact(location: str) -> Path:
    """A local directory for an artifact location recorded in a manifest (path or URI)."""
    if "://" not in location:
        path = Path(location)
        if not path.exists():
            raise missing_artifact(location)
        return path
    parent, _, name = location.rstrip("/").rpartition("/")
    return RunDir(parent).local_dir(name)


def local_reference(reference: str) -> str:
    """A model reference usable by ``from_pretrained``: URIs become local cached copies,
    absolute paths must exist (a missing one is a :func:`missing_artifact` error), hub ids
    and relative paths pass through."""
    if "://" in reference or os.path.isabs(reference):
        return str(resolve_artifact(reference))
    return reference


# --- users' data files: a local path or a URI, like the run directory -------------------------


def _remote(location: str) -> tuple[RunDir, str]:
    parent, _, name = location.rstrip("/").rpartition("/")
    if not name or "://" not in parent:
        raise StorageError(f"cannot open {location!r}: a URI names a file or directory in a bucket")
    return RunDir(parent), name


def data_kind(location: str) -> str:
    """``"file"``, ``"dir"`` or ``"missing"`` for a user's data (a local path, ``~`` allowed,
    or a ``pyarrow.fs`` URI such as ``s3://bucket/feedback.jsonl``); a
    :class:`StorageError` names a location that cannot be opened at all."""
    if "://" in location:
        storage, name = _remote(location)
        kind = storage._info(name).type
    else:
        path = Path(location).expanduser()
        try:
            kind = (pafs.FileType.Directory if path.is_dir() else
                    pafs.FileType.File if path.exists() else pafs.FileType.NotFound)  # fmt: skip
        except (OSError, ValueError) as exc:  # a name too long, a NUL byte...
            raise StorageError(f"cannot open {location!r:.80}: {exc.__class__.__name__}") from None
    if kind == pafs.FileType.Directory:
        return "dir"
    return "missing" if kind == pafs.FileType.NotFound else "file"


@contextlib.contextmanager
def local_data(location: str) -> Iterator[Path]:
    """A local path holding a user's data file or directory (:func:`data_kind`): the path
    itself, or for a URI a download (a file: into a temporary directory removed after the
    block, under its own name, so its suffix still tells its format; a directory: the
    download cache of :meth:`RunDir.local_dir`)."""
    if "://" not in location:
        yield Path(location).expanduser()
        return
    storage, name = _remote(location)
    if storage.is_dir(name):
        yield storage.local_dir(name)
        return
    with tempfile.TemporaryDirectory(prefix="psoups-data-") as scratch:
        local = Path(scratch) / name
        local.write_bytes(storage.read_bytes(name))
        yield local

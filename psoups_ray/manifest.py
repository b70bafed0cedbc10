"""``manifest.json``: the versioned record of a run directory.

Layout (schema version 1)::

    {
      "schema_version": 1,
      "psoups_version": "0.1.0",
      "created_at": "...", "updated_at": "...",
      "config": {...},             # the resolved config of the latest invocation
      "preferences": {...},        # the preference space
      "stages": {"base": {"status": "complete", "fingerprint": "...", "inputs": {...},
                          "started_at": "...", "finished_at": "...", "seconds": 161.2}},
      "base": {"model_path": ..., "tokenizer_path": ..., "metrics": {...}},
      "feedback": {...}, "rewards": {"<POLE>": {"path": ..., "metrics": {...}}},
      "policies": {"<POLE>": {...}}, "baselines": {"<NAME>": {...}},
      "tuned_weights": {"<COMBO>": {"<POLE>": w}}, "evaluation": {...}
    }

Only the driver writes it, always atomically (see :meth:`RunDir.write_bytes`):
a crash leaves the previous complete manifest, never half of one.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

from psoups_ray import __version__
from psoups_ray.errors import StorageError
from psoups_ray.rundir import RunDir

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
STAGE_ORDER = ("base", "feedback", "rewards", "policies", "tune", "evaluate", "report")
"""The pipeline's stages in order, as the manifest's ``stages`` records them."""
ARTIFACT_SECTIONS = (
    "base",
    "feedback",
    "rewards",
    "policies",
    "baselines",
    "tuned_weights",
    "evaluation",
    "report",
)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists are leaves)."""
    if isinstance(tree, dict) and tree:
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): tree}


def diff_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable ``key: old -> new`` lines for every leaf that differs."""
    flat_old, flat_new = flatten(old), flatten(new)
    lines = []
    for key in sorted(set(flat_old) | set(flat_new)):
        before, after = flat_old.get(key, "<unset>"), flat_new.get(key, "<unset>")
        if before != after:
            lines.append(f"{key}: {before!r} -> {after!r}")
    return lines


class Manifest:
    """The manifest of one run directory; every mutating method saves it atomically."""

    def __init__(self, rundir: RunDir, data: dict[str, Any]):
        self.rundir = rundir
        self.data = data

    # -- open / save ---------------------------------------------------------------
    @classmethod
    def open(cls, rundir: RunDir, config: dict[str, Any], preferences: dict[str, Any]) -> Manifest:
        """Load the run directory's manifest, or create it. ``config`` becomes the latest."""
        if rundir.exists(MANIFEST_NAME):
            manifest = cls.load(rundir)
            manifest.data["config"] = config
            manifest.data["preferences"] = preferences
        else:
            now = _now()
            data: dict[str, Any] = {
                "schema_version": SCHEMA_VERSION,
                "psoups_version": __version__,
                "created_at": now,
                "updated_at": now,
                "config": config,
                "preferences": preferences,
                "stages": {},
            }
            data.update({section: {} for section in ARTIFACT_SECTIONS})
            manifest = cls(rundir, data)
        manifest.save()
        return manifest

    @classmethod
    def load(cls, rundir: RunDir) -> Manifest:
        """Read and check an existing manifest (no write)."""
        if not rundir.exists(MANIFEST_NAME):
            raise StorageError(
                f"{rundir.location} is not a psoups run directory (no {MANIFEST_NAME}); "
                f"create one with `psoups run --out {rundir.location}`"
            )
        data = rundir.read_json(MANIFEST_NAME)
        where = rundir.uri(MANIFEST_NAME)
        if not isinstance(data, dict) or "schema_version" not in data:
            raise StorageError(f"{where} is not a psoups_ray manifest (no schema_version)")
        version = data["schema_version"]
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise StorageError(
                f"{where} has schema_version {version!r}; this psoups_ray ({__version__}) reads "
                f"versions up to {SCHEMA_VERSION}. Upgrade psoups_ray or use a new --out"
            )
        data.setdefault("stages", {})
        for section in ARTIFACT_SECTIONS:
            data.setdefault(section, {})
        return cls(rundir, data)

    def save(self) -> None:
        self.data["updated_at"] = _now()
        self.rundir.write_json(MANIFEST_NAME, self.data)

    # -- stage bookkeeping -----------------------------------------------------------
    def stage(self, name: str) -> dict[str, Any] | None:
        return self.data["stages"].get(name)

    def is_complete(self, name: str) -> bool:
        record = self.stage(name)
        return bool(record) and record.get("status") == "complete"

    def start_stage(self, name: str, fingerprint: str, inputs: dict[str, Any]) -> None:
        self.data["stages"][name] = {
            "status": "running",
            "fingerprint": fingerprint,
            "inputs": inputs,
            "started_at": _now(),
        }
        self.save()

    def complete_stage(
        self,
        name: str,
        section: dict[str, Any],
        seconds: float,
        extra_sections: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Record a stage's artifacts (its manifest section, and any other sections it owns,
        e.g. ``baselines`` for ``policies``) and mark it complete, in one write."""
        self.data[name] = section
        for key, value in (extra_sections or {}).items():
            self.data[key] = value
        record = self.data["stages"][name]
        record.update(status="complete", finished_at=_now(), seconds=round(seconds, 2))
        record.pop("error", None)
        self.save()

    def fail_stage(self, name: str, error: str) -> None:
        record = self.data["stages"].setdefault(name, {})
        record.update(status="failed", error=error[-2000:], finished_at=_now())
        self.save()

    def invalidate(self, names: list[str]) -> list[str]:
        """Forget the completion of ``names`` (their inputs changed); returns those dropped."""
        dropped = [n for n in names if n in self.data["stages"]]
        for name in dropped:
            del self.data["stages"][name]
        if dropped:
            self.save()
        return dropped

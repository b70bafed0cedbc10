"""Typed run artifacts: a run directory's manifest read into objects.

Every stage reads what the stages before it left through :class:`RunArtifacts`: the base,
the reward models and policies by pole, the baselines, the tuned weights and the prompt
splits. This is the one place that says what is missing and what to do about it: a stage
that has not run ("run the rewards stage first"), or an artifact the manifest records but
storage no longer holds ("restore it, or re-run the stage with --force").

Locations of what a stage produced are recorded relative to the run directory
(``./policies/P1A/adapter``, :meth:`psoups_ray.rundir.RunDir.locate`), so a run copied or
moved to another path, machine or bucket reads the same; a hub id or a user's file stays
as it was given. Older runs recorded absolute locations, which still resolve.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from psoups_ray.errors import PsoupsError, StorageError
from psoups_ray.manifest import Manifest
from psoups_ray.preferences import PreferenceSpace, PreferenceSpaceSpec
from psoups_ray.rundir import RunDir, local_reference

FEEDBACK_DIR = "feedback"
TRAIN_PATH = f"{FEEDBACK_DIR}/train.jsonl"
EVAL_PATH = f"{FEEDBACK_DIR}/eval.jsonl"
PROMPTS_PATH = f"{FEEDBACK_DIR}/prompts.json"
SPLIT_PATHS: dict[str, str] = {"train": TRAIN_PATH, "eval": EVAL_PATH}
ROW_FIELDS = ("prompt", "pole", "chosen", "rejected")
Split = Literal["train", "eval"]
PROMPTS_FILES = {  # the stage that owns each prompt split, and where it writes it
    "train": PROMPTS_PATH,
    "held_out": PROMPTS_PATH,
    "tune_trials": "tune/prompts.json",
    "tune_check": "tune/prompts.json",
    "evaluation": "evaluation/prompts.json",
}
STAGE_OF_SECTION = {
    "base": "base",
    "feedback": "feedback",
    "rewards": "rewards",
    "policies": "policies",
    "baselines": "policies",
    "tuned_weights": "tune",
    "tune": "tune",
    "evaluation": "evaluate",
}


@dataclass(frozen=True)
class PreferenceRow:
    """One pair of feedback for one pole: ``chosen`` satisfies ``pole`` better than ``rejected``."""

    prompt: str
    pole: str
    chosen: str
    rejected: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def load_feedback(rundir: RunDir, split: Split) -> list[PreferenceRow]:
    """The feedback stage's ``train`` or ``eval`` pairs from a run directory."""
    if split not in SPLIT_PATHS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    relpath = SPLIT_PATHS[split]
    if not rundir.exists(relpath):
        raise StorageError(
            f"missing {rundir.uri(relpath)}; run the feedback stage first "
            f"(psoups feedback --out {rundir.location})"
        )
    rows = []
    for number, line in enumerate(rundir.read_text(relpath).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            rows.append(PreferenceRow(*(record[field] for field in ROW_FIELDS)))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise StorageError(
                f"{rundir.uri(relpath)}: line {number} is not a feedback row ({exc}); re-run "
                "the feedback stage with --force"
            ) from None
    return rows


def _location_exists(location: str) -> bool:
    """Whether a recorded location is there (a hub id or a relative path: not checkable)."""
    if "://" in location:
        parent, _, name = location.rstrip("/").rpartition("/")
        return RunDir(parent).exists(name)
    return not os.path.isabs(location) or os.path.exists(location)


def missing_stage(stage: str, location: str, what: str) -> PsoupsError:
    """The error for a stage whose artifacts a later one needs but the run lacks."""
    return PsoupsError(
        f"{location} has no {what}; run the {stage} stage first "
        f"(psoups run --stages {stage} --out {location})"
    )


@dataclass(frozen=True)
class BaseArtifact:
    """The base model every adapter of the run was trained on."""

    model: str  # a local path, URI or hub id
    tokenizer: str
    dtype: str = "float32"
    revision: str | None = None
    trust_remote_code: bool = False

    def load_options(self) -> dict[str, Any]:
        """``from_pretrained`` arguments: the pinned revision (of a hub id) and remote code."""
        return {"revision": self.revision, "trust_remote_code": self.trust_remote_code}

    def local_model(self) -> str:
        """The model as ``from_pretrained`` takes it (a remote artifact downloaded)."""
        return local_reference(self.model)

    def local_tokenizer(self) -> str:
        return local_reference(self.tokenizer)


@dataclass(frozen=True)
class AdapterArtifact:
    """A LoRA adapter the run trained: a pole's reward model or policy, or a baseline."""

    name: str  # pole id, or the baseline's name
    kind: str  # "reward", "pole", "pmorl" or "rlhf"
    location: str  # resolved: a local path or URI
    metrics: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def local_dir(self) -> str:
        """A local directory holding the adapter (downloaded when remote)."""
        return local_reference(self.location)


@dataclass(frozen=True)
class ModelSet:
    """What a process loads to generate with soups and score them, picklable for Ray
    (:class:`psoups_ray.runtime.loading.LoadedModels` loads it)."""

    base: BaseArtifact
    policies: dict[str, str]  # adapter name -> location: mixed in this order
    rewards: dict[str, str] = field(default_factory=dict)  # pole -> reward adapter location
    preference_prompts: dict[str, str] = field(default_factory=dict)  # pole -> prompt
    reward_max_length: int | None = None
    dtype: str | None = None  # None: the base's


class RunArtifacts:
    """What a run directory's manifest records, as typed objects."""

    def __init__(self, rundir: RunDir, data: dict[str, Any]):
        self.rundir = rundir
        self.data = data

    @classmethod
    def load(cls, run: str | RunDir) -> RunArtifacts:
        rundir = run if isinstance(run, RunDir) else RunDir(run)
        return cls(rundir, Manifest.load(rundir).data)

    @property
    def location(self) -> str:
        return self.rundir.location

    # -- what the run is about ---------------------------------------------------------
    @property
    def space(self) -> PreferenceSpace:
        return PreferenceSpace.from_spec(
            PreferenceSpaceSpec.model_validate(self.data["preferences"])
        )

    @property
    def config(self):
        """The resolved config of the run's latest invocation."""
        from psoups_ray.config import PsoupsConfig

        return PsoupsConfig.model_validate(self.data["config"])

    def section(self, name: str) -> dict[str, Any]:
        """A manifest section, or the error naming the stage that writes it."""
        value = self.data.get(name) or {}
        if not value:
            stage = STAGE_OF_SECTION.get(name, name)
            raise missing_stage(stage, self.location, name.replace("_", " "))
        return value

    # -- models --------------------------------------------------------------------------
    @property
    def base(self) -> BaseArtifact:
        section = self.data.get("base") or {}
        if "model_path" not in section:
            raise missing_stage("base", self.location, "base model")
        settings = self._base_settings()
        # A pinned revision is the hub's: a copy the base stage saved (SFT, GGUF) has none.
        from_hub = section["model_path"] == section.get("model")
        return BaseArtifact(
            model=self.rundir.resolve(section["model_path"]),
            tokenizer=self.rundir.resolve(section.get("tokenizer_path") or section["model_path"]),
            dtype=settings.get("dtype") or "float32",
            revision=section.get("revision", settings.get("revision")) if from_hub else None,
            trust_remote_code=bool(settings.get("trust_remote_code", False)),
        )

    def _base_settings(self) -> dict[str, Any]:
        """The ``base`` config the base stage ran with (else the latest invocation's)."""
        stage = (self.data.get("stages") or {}).get("base") or {}
        recorded = (stage.get("inputs") or {}).get("base")
        return recorded or (self.data.get("config") or {}).get("base") or {}

    def rewards(self, poles: list[str] | None = None) -> dict[str, AdapterArtifact]:
        """Reward models by pole (every pole of the space unless ``poles``)."""
        return self._adapters("rewards", "reward", poles or self.space.pole_ids)

    def policies(self, poles: list[str] | None = None) -> dict[str, AdapterArtifact]:
        """Pole policies by pole (every pole of the space unless ``poles``)."""
        return self._adapters("policies", "pole", poles or self.space.pole_ids)

    def trained_policies(self) -> dict[str, AdapterArtifact]:
        """The pole policies the run has, in the space's order (serving takes what exists)."""
        recorded = self.data.get("policies") or {}
        poles = [pole for pole in self.space.pole_ids if pole in recorded]
        if not poles:
            raise missing_stage("policies", self.location, "pole policies")
        return self._adapters("policies", "pole", poles)

    def baselines(self, names: list[str]) -> dict[str, AdapterArtifact]:
        """Baseline policies by name (``pmorl``, ``rlhf``)."""
        recorded = self.data.get("baselines") or {}
        missing = [name for name in names if name not in recorded]
        if missing:
            raise PsoupsError(
                f"the run has no baseline policy {', '.join(missing)} (it has: "
                f"{', '.join(recorded) or 'none'}); add it to policies.baselines and run "
                "`psoups policies`"
            )
        clashes = [name for name in names if name in self.space.pole_ids]
        if clashes:
            raise PsoupsError(f"baseline name(s) {clashes} clash with pole ids")
        return {
            name: AdapterArtifact(
                name,
                recorded[name].get("kind", name),
                self.rundir.resolve(recorded[name]["path"]),
                recorded[name].get("metrics") or {},
            )  # fmt: skip
            for name in names
        }

    def _adapters(self, section: str, kind: str, poles: list[str]) -> dict[str, AdapterArtifact]:
        records = self.data.get(section) or {}
        missing = [pole for pole in poles if pole not in records]
        if missing:
            raise PsoupsError(
                f"the run has no {section} artifacts for {', '.join(missing)}; run the "
                f"{section} stage first (psoups run --stages {section} --out {self.location})"
            )
        return {
            pole: AdapterArtifact(
                pole,
                kind,
                self.rundir.resolve(records[pole]["path"]),
                records[pole].get("metrics") or {},
            )  # fmt: skip
            for pole in poles
        }

    def model_set(
        self,
        baselines: list[str] = (),
        rewards: bool = True,
        reward_max_length: int | None = None,
        dtype: str | None = None,
        policies: bool = True,
    ) -> ModelSet:
        """The base, the pole policies (then ``baselines``, mixed like the poles: weight 1
        on a baseline alone is that baseline's policy) and, with ``rewards``, every pole's
        reward model. Measuring soups (``rewards``) needs every pole's policy; serving
        takes the poles that have one; scoring texts alone (``policies`` false) none."""
        space = self.space
        if not policies:
            chosen = {}
        else:
            chosen = self.policies() if rewards else self.trained_policies()
        adapters = {name: artifact.location for name, artifact in chosen.items()}
        adapters.update({n: a.location for n, a in self.baselines(list(baselines)).items()})
        return ModelSet(
            base=self.base,
            policies=adapters,
            rewards={p: a.location for p, a in self.rewards().items()} if rewards else {},
            preference_prompts={pole: space.pole(pole).prompt for pole in space.pole_ids},
            reward_max_length=reward_max_length,
            dtype=dtype,
        )

    def check_loadable(self, models: ModelSet) -> None:
        """Fail, naming every one, when an artifact ``models`` would load is gone (a hub id
        is checked when it is downloaded): before a service starts, not in its replicas."""
        locations = {
            "base model": models.base.model,
            "tokenizer": models.base.tokenizer,
            **{f"policy {name}": location for name, location in models.policies.items()},
            **{f"reward model {pole}": location for pole, location in models.rewards.items()},
        }
        missing = [
            f"{what} {location}"
            for what, location in locations.items()
            if not _location_exists(location)
        ]
        if missing:
            raise StorageError(
                f"{self.location} cannot be loaded: its manifest records "
                + "; ".join(missing)
                + ", which storage no longer holds. Restore them, or re-run the stages that "
                "produce them with --force (psoups run --stages STAGE --force --out "
                f"{self.location})"
            )

    @property
    def tuned_weights(self) -> dict[str, dict[str, float]]:
        """``{combination: {pole: weight}}`` (empty before the tune stage)."""
        return {
            key: {pole: float(w) for pole, w in weights.items()}
            for key, weights in (self.data.get("tuned_weights") or {}).items()
        }

    # -- prompt splits -------------------------------------------------------------------
    def prompts(self, split: str) -> list[str]:
        """A prompt split, as the stage that owns it wrote it: ``train`` and ``held_out``
        (feedback), ``tune_trials`` and ``tune_check`` (tune), ``evaluation`` (evaluate)."""
        if split not in PROMPTS_FILES:
            raise ValueError(f"unknown prompt split {split!r}; splits: {', '.join(PROMPTS_FILES)}")
        relpath = PROMPTS_FILES[split]
        if not self.rundir.exists(relpath):
            if split in ("train", "held_out") and self.data.get("feedback"):
                return self._feedback_prompts(split)  # runs from before prompts.json
            stage = {"feedback": "feedback", "tune": "tune", "evaluation": "evaluate"}[
                relpath.split("/")[0]
            ]
            raise missing_stage(stage, self.location, f"{split} prompts ({relpath})")
        splits = self.rundir.read_json(relpath)
        if split not in splits:
            raise StorageError(
                f"{self.rundir.uri(relpath)} has no {split!r} split; re-run the stage that "
                "wrote it with --force"
            )
        return list(splits[split])

    def _feedback_prompts(self, split: str) -> list[str]:
        rows = self.feedback("train" if split == "train" else "eval")
        return list(dict.fromkeys(row.prompt for row in rows))

    def feedback(self, split: Split) -> list[PreferenceRow]:
        """The feedback stage's ``train`` or ``eval`` pairs."""
        return load_feedback(self.rundir, split)

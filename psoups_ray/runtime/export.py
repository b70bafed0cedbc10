"""``psoups merge``: the soup of a run's pole policies for one combination, exported.

Weights default to the tuned weights the manifest holds for the combination, else
uniform. Export as a PEFT adapter directory (``adapter``) or a merged full model
(``model``); both load with plain transformers/PEFT.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from psoups_ray.artifacts import BaseArtifact, RunArtifacts
from psoups_ray.errors import PsoupsError
from psoups_ray.progress import log
from psoups_ray.runtime.loading import load_base_model, load_base_tokenizer
from psoups_ray.runtime.merge import MergeMethod, merge_adapters
from psoups_ray.scratch import scratch_directory

ExportKind = Literal["adapter", "model"]


def parse_weights(text: str | None) -> dict[str, float] | None:
    """``"P1A=0.5,P2B=0.5"`` -> {"P1A": 0.5, "P2B": 0.5}; None/empty -> None."""
    if text is None or not text.strip():
        return None
    weights: dict[str, float] = {}
    for item in text.split(","):
        pole, sep, value = item.partition("=")
        if not sep or not pole.strip():
            raise PsoupsError(f"weights item {item!r} must look like POLE=NUMBER, e.g. P1A=0.5")
        try:
            weights[pole.strip().upper()] = float(value)
        except ValueError:
            raise PsoupsError(f"weight of {pole.strip()} is not a number: {value!r}") from None
    return weights


def soup_weights(
    combination: list[str], given: Mapping[str, float] | None, tuned: Mapping[str, Any] | None
) -> tuple[list[float], str]:
    """The weight per pole of ``combination`` and where they came from."""
    if given is not None:
        outside = sorted(set(given) - set(combination))
        if outside:
            raise PsoupsError(
                f"weights given for {', '.join(outside)}, which are not in the combination "
                f"{'+'.join(combination)}"
            )
        missing = [pole for pole in combination if pole not in given]
        if missing:
            raise PsoupsError(f"no weight given for {', '.join(missing)}")
        return [given[pole] for pole in combination], "given"
    if tuned:
        return [float(tuned[pole]) for pole in combination], "tuned"
    return [1.0 / len(combination)] * len(combination), "uniform"


def make_soup(
    run: str,
    combo: str,
    out: str,
    weights: Mapping[str, float] | None = None,
    method: MergeMethod = "delta",
    export: ExportKind = "adapter",
    density: float = 0.5,
    allow_negative: bool = False,
) -> dict[str, Any]:
    """Merge the run's pole policies for ``combo`` into ``out``; returns what was done."""
    artifacts = RunArtifacts.load(run)
    combination = list(artifacts.space.parse(combo))
    policies = artifacts.policies(combination)
    key = "+".join(combination)
    values, source = soup_weights(combination, weights, artifacts.tuned_weights.get(key))
    directories = [policies[pole].local_dir() for pole in combination]
    base = artifacts.base
    out_path = Path(out)
    if out_path.exists() and any(out_path.iterdir()):
        raise PsoupsError(f"{out} exists and is not empty; choose a new --out")
    with scratch_directory("soup") as workdir:
        adapter = merge_adapters(
            directories,
            combination,
            values,
            method,
            workdir / "adapter",
            base=base,
            density=density,
            allow_negative=allow_negative,
        )
        if export == "adapter":
            shutil.copytree(adapter, out_path, dirs_exist_ok=True)
        else:
            export_model(base, adapter, out_path)
        load_base_tokenizer(base).save_pretrained(str(out_path))
    summary = {
        "combination": key,
        "weights": dict(zip(combination, values, strict=True)),
        "weights_from": source,
        "method": method,
        "export": export,
        "out": str(out_path),
    }
    log(f"soup {key} ({method}, {source} weights {summary['weights']}) -> {out_path} ({export})")
    return summary


def export_model(base: BaseArtifact, adapter: Path, out: Path) -> None:
    """Save ``base`` with ``adapter`` merged into its weights as a plain model at ``out``."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(load_base_model(base), str(adapter)).merge_and_unload()
    merged.save_pretrained(str(out))

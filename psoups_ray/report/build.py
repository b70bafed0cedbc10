"""``report.md`` in the run directory, from the manifest and the stages' files.

Sections: configuration, stage timings, base model, reward models, policies (with the
PPO reward curves), tuned soups (with the Pareto fronts), evaluation (win-rate tables in
the paper's layout: rows = combinations, columns = opponents; attribute success and
reward per system; heatmaps) and example generations. A section whose stage has not run
says so. Plots go to ``report/*.png`` and are linked relatively, so the report reads the
same wherever the run directory is copied.
"""

from __future__ import annotations

import json
from typing import Any

from psoups_ray.manifest import Manifest
from psoups_ray.progress import log
from psoups_ray.report import plots
from psoups_ray.rundir import RunDir

REPORT_PATH = "report.md"
PLOTS_DIR = "report"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:+.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


class Report:
    """Collects Markdown lines and plots for one run directory."""

    def __init__(self, rundir: RunDir):
        self.rundir = rundir
        self.data = Manifest.load(rundir).data
        self.lines: list[str] = []
        self.plots: list[str] = []

    def image(self, name: str, png: bytes, alt: str) -> None:
        relpath = f"{PLOTS_DIR}/{name}"
        self.rundir.write_bytes(relpath, png)
        self.plots.append(relpath)
        self.lines += [f"![{alt}]({relpath})", ""]

    # -- sections ---------------------------------------------------------------------------
    def header(self) -> None:
        config = self.data.get("config", {})
        self.lines += [
            f"# P-Soups report: {config.get('name', 'run')}",
            "",
            f"Run directory `{self.rundir.location}`, psoups_ray {self.data.get('psoups_version')}"
            f", manifest updated {self.data.get('updated_at')}.",
            "",
            "## Configuration",
            "",
        ]
        base, rewards = config.get("base", {}), config.get("rewards", {})
        policies, tune = config.get("policies", {}), config.get("tune", {})
        evaluate = config.get("evaluate", {})
        settings = [
            ["base model", f"`{base.get('model')}`"],
            ["reward models", f"LoRA r={rewards.get('lora', {}).get('r')}, "
                              f"{rewards.get('steps')} steps, batch {rewards.get('batch_size')}"],
            ["policies (PPO)", f"{policies.get('steps')} steps x "
                               f"{policies.get('rollout_batch_size')} rollouts, KL coef "
                               f"{policies.get('kl_coef')}, baselines "
                               f"{', '.join(policies.get('baselines', [])) or 'none'}"],
            ["soup weights", f"{tune.get('search')} search, {tune.get('num_samples')} trials "
                             f"per combination on {tune.get('num_prompts')} prompts"],
            ["evaluation", f"{evaluate.get('num_prompts')} held-out prompts, "
                           f"{evaluate.get('bootstrap_samples')} bootstrap resamples"],
        ]  # fmt: skip
        self.lines += _table(["setting", "value"], settings)
        poles = [
            [pole["id"], dimension["name"], pole["prompt"]]
            for dimension in self.data.get("preferences", {}).get("dimensions", [])
            for pole in dimension["poles"]
        ]
        self.lines += ["Preference space:", "", *_table(["pole", "dimension", "prompt"], poles)]
        from psoups_ray.pipeline import STAGE_NAMES

        stages = self.data.get("stages", {})
        rows = [
            [name, stages[name].get("status", "?"), f"{stages[name].get('seconds', 0):.0f} s"]
            for name in STAGE_NAMES
            if name in stages and name != "report"
        ]
        self.lines += ["Stages:", "", *_table(["stage", "status", "time"], rows)]

    def base(self) -> None:
        metrics = (self.data.get("base") or {}).get("metrics") or {}
        self.lines += ["## Base model", ""]
        if not metrics:
            self.lines += ["Not run yet.", ""]
            return
        sft = metrics.get("sft", {})
        self.lines.append(
            f"{sft.get('num_parameters', 0):,} parameters, SFT {sft.get('steps')} steps "
            f"(final loss {sft.get('train_loss', float('nan')):.3f}, "
            f"{sft.get('train_seconds', 0):.0f} s)."
        )
        rates = metrics.get("attribute_rates")
        if rates:
            self.lines += [
                "",
                "Share of unprompted base samples that exhibit each pole (the attribute checkers):",
                "",
                *_table(list(rates), [[_pct(v) for v in rates.values()]]),
            ]
        self.lines.append("")

    def rewards(self) -> None:
        records = self.data.get("rewards") or {}
        self.lines += ["## Reward models", ""]
        if not records:
            self.lines += ["Not run yet.", ""]
            return
        rows = []
        for pole, record in records.items():
            metrics = record.get("metrics", {})
            correlation = metrics.get("checker_correlation_on_base_samples")
            rows.append([
                pole, _pct(metrics.get("accuracy")), f"{metrics.get('pairs', '–')}",
                f"{metrics.get('mean_margin', 0):.2f}",
                "–" if correlation is None else f"{correlation:.2f}",
            ])  # fmt: skip
        header = ["pole", "held-out accuracy", "pairs", "mean margin", "corr. with checker"]
        self.lines += _table(header, rows)

    def policies(self) -> None:
        self.lines += ["## Policies (PPO, one LoRA per pole) and baselines", ""]
        runs = {**(self.data.get("policies") or {}), **(self.data.get("baselines") or {})}
        if not runs:
            self.lines += ["Not run yet.", ""]
            return
        rows, histories = [], {}
        for name, record in runs.items():
            evaluation = record.get("metrics", {}).get("eval", {})
            before, after = evaluation.get("base", {}), evaluation.get("policy", {})
            rows.append([
                name, f"{_num(before.get('reward'))} → {_num(after.get('reward'))}",
                f"{_pct(before.get('success_rate'))} → {_pct(after.get('success_rate'))}",
                f"{after.get('kl_to_reference', float('nan')):.1f}",
                f"{record.get('metrics', {}).get('train_seconds', 0):.0f} s",
            ])  # fmt: skip
            folder = "policies" if record.get("kind") == "pole" else "baselines"
            metrics_path = f"{folder}/{name}/metrics.json"
            if self.rundir.exists(metrics_path):
                history = self.rundir.read_json(metrics_path).get("history") or []
                if history:
                    histories[name] = history
        header = ["policy", "reward base → policy", "target success base → policy",
                  "KL to base", "train time"]  # fmt: skip
        self.lines += [
            "Measured on held-out prompts after training; a baseline's reward and success "
            "are over the combinations it was trained for.",
            "",
            *_table(header, rows),
        ]
        if histories:
            self.image("reward_curves.png", plots.reward_curves(histories), "PPO reward curves")

    def tune(self) -> None:
        self.lines += ["## Tuned soups", ""]
        tuned = self.data.get("tuned_weights") or {}
        section = self.data.get("tune") or {}
        if not tuned:
            self.lines += ["Not run yet.", ""]
            return
        # Uniform vs tuned: the evaluate stage's measurement when there is one (more prompts,
        # none of them tune's), else the tune stage's own held-out comparison.
        metrics = (self.data.get("evaluation") or {}).get("metrics") or {}
        rows = []
        for key, weights in tuned.items():
            measured = metrics.get(key, {})
            if "psoups-uniform" in measured and "psoups-tuned" in measured:
                uniform, best = measured["psoups-uniform"], measured["psoups-tuned"]
                reward = "reward"
            else:
                held_out = section.get("combinations", {}).get(key, {}).get("held_out", {})
                uniform, best = held_out.get("uniform", {}), held_out.get("tuned", {})
                reward = "objective"
            rows.append([
                key, " / ".join(f"{pole} {w:.2f}" for pole, w in weights.items()),
                f"{_num(uniform.get(reward))} → {_num(best.get(reward))}",
                f"{_pct(uniform.get('success_rate'))} → {_pct(best.get('success_rate'))}",
            ])  # fmt: skip
        header = ["combination", "tuned weights", "reward uniform → tuned",
                  "success uniform → tuned"]  # fmt: skip
        where = (
            f"the evaluation's {self.data['evaluation'].get('num_prompts')} held-out prompts"
            if metrics
            else f"{section.get('num_report_prompts', '?')} held-out prompts no trial saw"
        )
        self.lines += [
            f"{section.get('search', '?')} search over {section.get('num_trial_prompts', '?')} "
            f"prompts per trial; uniform vs tuned soup measured on {where}.",
            "",
            *_table(header, rows),
        ]
        if self.rundir.exists("tune/pareto.json"):
            fronts = self.rundir.read_json("tune/pareto.json")
            if fronts:
                self.image("pareto_fronts.png", plots.pareto_grid(fronts), "Pareto fronts")

    def evaluation(self) -> None:
        self.lines += ["## Evaluation", ""]
        evaluation = self.data.get("evaluation") or {}
        if not evaluation:
            self.lines += ["Not run yet.", ""]
            return
        combinations = evaluation["combinations"]
        self.lines += [
            f"{evaluation['num_prompts']} held-out prompts per combination. Win rate of each "
            "P-Soups variant against each opponent, ties counting half, with "
            f"{evaluation['confidence']:.0%} bootstrap intervals (prompts resampled).",
            "",
        ]
        for judge, table in evaluation["win_rates"].items():
            for soup, rates in table.items():
                opponents = [system for system in evaluation["systems"] if system in rates]
                self.lines += [f"### {soup}: win rate by the {judge} judge", ""]
                header = ["combination", *[f"vs {other}" for other in opponents]]
                rows = [
                    [key, *[_cell(rates[o]["combinations"][key]) for o in opponents]]
                    for key in combinations
                ]
                rows.append(["**overall**", *[_cell(rates[o]["overall"]) for o in opponents]])
                self.lines += _table(header, rows)
                if soup == "psoups-tuned" or len(table) == 1:
                    self.image(
                        f"win_rates_{judge}_{soup}.png",
                        plots.win_rate_heatmap(
                            rates, opponents, combinations, f"{soup} win rate, {judge} judge"
                        ),
                        f"{soup} win rates ({judge} judge)",
                    )
        metrics = evaluation["metrics"]
        systems = evaluation["systems"]
        for name, title, fmt in (
            ("success_rate", "Attribute success (responses exhibiting every requested pole)",
             _pct),
            ("reward", "Mean normalised reward of the combination's poles", _num),
        ):  # fmt: skip
            if name not in metrics[combinations[0]][systems[0]]:
                continue
            rows = [[key, *[fmt(metrics[key][s][name]) for s in systems]] for key in combinations]
            overall = evaluation["metrics_overall"]
            rows.append(["**mean**", *[fmt(overall[s][name]) for s in systems]])
            self.lines += [f"### {title}", "", *_table(["combination", *systems], rows)]
        self.examples(evaluation)

    def examples(self, evaluation: dict[str, Any], per_combination: int = 1) -> None:
        """The first prompt of each combination: base vs the tuned soup."""
        relpath = "evaluation/samples.jsonl"
        if not self.rundir.exists(relpath):
            return
        wanted = [s for s in ("base", "base+prompt", "psoups-tuned") if s in evaluation["systems"]]
        seen: dict[tuple[str, str], int] = {}
        rows = []
        for line in self.rundir.read_text(relpath).splitlines():
            record = json.loads(line)
            slot = (record["combination"], record["system"])
            if record["system"] not in wanted or seen.get(slot, 0) >= per_combination:
                continue
            seen[slot] = seen.get(slot, 0) + 1
            rows.append(record)
        self.lines += ["### Example generations", ""]
        for key in evaluation["combinations"]:
            chosen = [r for r in rows if r["combination"] == key]
            if not chosen:
                continue
            self.lines += [f"**{key}**, prompt: *{chosen[0]['prompt']}*", ""]
            for record in chosen:
                shown = record.get("poles_shown")
                note = f" (checkers: {', '.join(shown) or 'no pole'})" if shown is not None else ""
                text = record["response"].replace("\n", " ").replace("|", "\\|")
                self.lines += [f"- `{record['system']}`{note}: {text}"]
            self.lines.append("")

    def footer(self) -> None:
        self.lines += [
            "## Serve it",
            "",
            "```bash",
            f"psoups serve --run {self.rundir.location}",
            "```",
            "",
            'then ask for any combination, e.g. `model: "psoups:P1A+P2B+P3A"` on '
            "`http://127.0.0.1:8000/v1/chat/completions`.",
            "",
        ]


def _cell(rate: dict[str, Any]) -> str:
    return f"{rate['win_rate']:.0%} [{rate['ci_low']:.0%}, {rate['ci_high']:.0%}]"


def build_report(rundir: RunDir) -> dict[str, Any]:
    """Write ``report.md`` and its plots; returns the manifest's ``report`` section."""
    report = Report(rundir)
    report.header()
    report.base()
    report.rewards()
    report.policies()
    report.tune()
    report.evaluation()
    report.footer()
    rundir.write_text(REPORT_PATH, "\n".join(report.lines))
    log(f"report: {rundir.uri(REPORT_PATH)} ({len(report.plots)} plots)")
    return {"path": rundir.uri(REPORT_PATH), "plots": [rundir.uri(p) for p in report.plots]}


def rebuild_report(location: str) -> dict[str, Any]:
    """``psoups report --run RUN``: rebuild the report of an existing run directory and
    record it in the manifest, without touching the run's recorded config."""
    import time

    from psoups_ray.config import PsoupsConfig

    rundir = RunDir(location)
    manifest = Manifest.load(rundir)
    manifest.start_stage("report", PsoupsConfig().section_fingerprint(), {})
    started = time.monotonic()
    try:
        section = build_report(rundir)
    except BaseException as exc:
        manifest.fail_stage("report", f"{type(exc).__name__}: {exc}")
        raise
    manifest.complete_stage("report", section, time.monotonic() - started)
    return section

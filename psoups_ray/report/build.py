"""``report.md`` in the run directory, from the manifest and the stages' files.

Sections: configuration, stage timings, base model, reward models, policies (with the
PPO reward curves), tuned soups (with the Pareto fronts), evaluation (win-rate tables in
the paper's layout: rows = combinations, columns = opponents; attribute success and
reward per system; with the text judges each system's success against base; heatmaps)
and example generations (base vs the tuned soup). A section whose stage has not run
says so. Plots go to ``report/*.png`` and are linked relatively, so the report reads the
same wherever the run directory is copied.
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

from psoups_ray.manifest import STAGE_ORDER, Manifest
from psoups_ray.progress import log
from psoups_ray.report import plots
from psoups_ray.rundir import RunDir

REPORT_PATH = "report.md"
PLOTS_DIR = "report"
JUDGE_TITLES = {"text": "programmatic text judges"}
"""How a judge is named in headings and plots, where ``<name> judge`` would not do."""
EXAMPLE_SYSTEMS = ("base", "psoups-tuned")
EXAMPLE_CHARS = 400


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def _num(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:+.{digits}f}"


def _judge_title(judge: str) -> str:
    return JUDGE_TITLES.get(judge, f"{judge} judge")


def _cell_text(text: str, limit: int) -> str:
    """``text`` as one Markdown table cell: cut to ``limit`` characters, HTML and Markdown
    escapes for backslashes and pipes, line breaks as ``<br>``."""
    text = text.strip()
    if len(text) > limit:
        text = text[:limit].rstrip() + " …"
    text = html.escape(text, quote=False).replace("\\", "\\\\").replace("|", "\\|")
    return "<br>".join(line.strip() for line in text.splitlines())


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
        stages = self.data.get("stages", {})
        rows = [
            [name, stages[name].get("status", "?"), f"{stages[name].get('seconds', 0):.0f} s"]
            for name in STAGE_ORDER
            if name in stages and name != "report"
        ]
        self.lines += ["Stages:", "", *_table(["stage", "status", "time"], rows)]

    def base(self) -> None:
        metrics = (self.data.get("base") or {}).get("metrics") or {}
        self.lines += ["## Base model", ""]
        if not metrics:
            self.lines += ["Not run yet.", ""]
            return
        section = self.data["base"]
        sft = metrics.get("sft")
        reference = metrics.get("reference")
        if reference is not None:  # a real model
            source = f"`{section.get('model')}`"
            if section.get("gguf_file"):
                source += f", GGUF file `{section['gguf_file']}` (dequantised to float32)"
            parameters = section.get("parameters")
            self.lines.append(
                f"{source}: {reference.get('model_type')} "
                f"({', '.join(reference.get('architectures') or []) or 'causal LM'})"
                + (f", {parameters:,} parameters" if parameters else "")
                + f", vocabulary {reference.get('tokenizer_vocab_size')}, chat template "
                + ("yes" if reference.get("has_chat_template") else "no")
                + ("." if sft else "; used as it is (no SFT data given).")
            )
        if sft:
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
        evaluations = {
            name: record.get("metrics", {}).get("eval", {}) for name, record in runs.items()
        }
        text_judged = any(
            "text_judge_win_rate" in e.get("policy", {}) for e in evaluations.values()
        )
        with_success = any("success_rate" in e.get("policy", {}) for e in evaluations.values())
        with_agreement = any(
            "reward_judge_agreement" in e.get("policy", {}) for e in evaluations.values()
        )
        rows, histories = [], {}
        for name, record in runs.items():
            before, after = evaluations[name].get("base", {}), evaluations[name].get("policy", {})
            rows.append([
                name, f"{_num(before.get('reward'))} → {_num(after.get('reward'))}",
                f"{after.get('kl_to_reference', float('nan')):.1f}",
                f"{record.get('metrics', {}).get('episodes', '–')}",
                f"{record.get('metrics', {}).get('train_seconds', 0):.0f} s",
            ])  # fmt: skip
            if with_success:  # the tiny world's attribute checkers
                success = f"{_pct(before.get('success_rate'))} → {_pct(after.get('success_rate'))}"
                rows[-1].insert(2, success)
            if text_judged:
                rates = after.get("text_judge_win_rate") or {}
                rows[-1].append(", ".join(f"{pole} {_pct(v)}" for pole, v in rates.items()) or "–")
            if with_agreement:
                agreement = after.get("reward_judge_agreement") or {}
                rows[-1].append(
                    ", ".join(
                        f"{pole} {_pct(entry.get('agreement'))} ({entry.get('pairs', 0)})"
                        for pole, entry in agreement.items()
                    )
                    or "–"
                )
            folder = "policies" if record.get("kind") == "pole" else "baselines"
            metrics_path = f"{folder}/{name}/metrics.json"
            if self.rundir.exists(metrics_path):
                history = self.rundir.read_json(metrics_path).get("history") or []
                if history:
                    histories[name] = history
        header = ["policy", "reward base → policy", "KL to base", "PPO episodes", "train time"]
        if with_success:
            header.insert(2, "target success base → policy")
        note = ""
        if text_judged:
            header.append("text judge win rate vs base")
            note = (
                " The text judge win rate is, per pole, the share of prompts where the "
                "programmatic text judges prefer the policy's response to the base's (ties "
                "half)."
            )
        if with_agreement:
            header.append("reward model agrees with judge (decided pairs)")
            note += (
                " Agreement is, per pole, the share of the policy-vs-base pairs the judge "
                "decides where the pole's reward model ranks them the same way: near 50% "
                "while the reward rose means the policy learnt what its reward model "
                "likes, not what the judge checks (reward hacking)."
            )
        self.lines += [
            "Measured on held-out prompts after training; a baseline's reward and success "
            "are over the combinations it was trained for. PPO episodes: the queries each "
            f"run sampled and learnt from (iterations x rollouts x workers).{note}",
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
                reward = "mean_reward"
            shown = " / ".join(f"{pole} {w:.2f}" for pole, w in weights.items())
            total = sum(weights.values())
            if not math.isclose(total, 1.0, abs_tol=5e-3):
                shown += f" (total {total:.2f})"
            rows.append([
                key, shown,
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
            f"prompts per trial; {self._tune_objective(section)} Uniform vs tuned soup "
            f"measured on {where}.",
            "",
            *_table(header, rows),
        ]
        if self.rundir.exists("tune/pareto.json"):
            fronts = self.rundir.read_json("tune/pareto.json")
            if fronts:
                self.image("pareto_fronts.png", plots.pareto_grid(fronts), "Pareto fronts")

    def _tune_objective(self, section: dict[str, Any]) -> str:
        """One sentence: what the trials maximised, over which total weights (as the tune
        stage recorded them: a later invocation's config may say otherwise)."""
        kind = "the worst" if section.get("objective") == "worst" else "the mean"
        references = section.get("references")
        if section.get("pole_score") == "gain" and references:
            ends = ", ".join(
                f"{pole} {_num(ref['base'])} → {_num(ref['policy'])}"
                for pole, ref in references.items()
            )
            what = (
                f"maximised {kind} of the poles' gains over the base (0: the base, 1: the "
                f"pole's own policy; reward base → policy on the trial prompts: {ends})"
            )
        else:
            what = f"maximised {kind} of the poles' mean normalised rewards"
        low, high = section.get("scale") or (1.0, 1.0)
        if low == high == 1.0:
            return f"trials {what}, weights summing to 1."
        if low == high:
            return f"trials {what}, weights summing to {low:g}."
        return f"trials {what}, the weights' total searched from {low:g} to {high:g}."

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
                judge_title = _judge_title(judge)
                self.lines += [f"### {soup}: win rate by the {judge_title}", ""]
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
                            rates, opponents, combinations, f"{soup} win rate, {judge_title}"
                        ),
                        f"{soup} win rates ({judge_title})",
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
        self.text_success(evaluation)
        self.examples(evaluation)

    def text_success(self, evaluation: dict[str, Any]) -> None:
        """Per combination, each system's text judge success against base, pole by pole."""
        metrics, systems = evaluation["metrics"], evaluation["systems"]
        judged = [key for key in evaluation["combinations"]
                  if "text_success" in metrics[key][systems[0]]]  # fmt: skip
        if not judged:
            return
        self.lines += [
            "### Text judge success vs base",
            "",
            "Share of prompts where the programmatic text judges prefer the system's response "
            "to base's for the pole, ties half (base against itself: 50%).",
            "",
        ]
        for key in judged:
            poles = list(metrics[key][systems[0]]["text_success"])
            rows = [
                [system, *[_pct(metrics[key][system]["text_success"][pole]) for pole in poles],
                 _pct(metrics[key][system]["text_success_mean"])]
                for system in systems
            ]  # fmt: skip
            self.lines += [f"**{key}**", "", *_table(["system", *poles, "mean"], rows)]

    def examples(self, evaluation: dict[str, Any], per_combination: int = 2) -> None:
        """The first ``per_combination`` prompts of each combination, base and the tuned
        soup side by side (cut to :data:`EXAMPLE_CHARS` characters)."""
        relpath = "evaluation/samples.jsonl"
        if not self.rundir.exists(relpath):
            return
        systems = [system for system in EXAMPLE_SYSTEMS if system in evaluation["systems"]]
        answers: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}  # key -> prompt -> system
        for line in self.rundir.read_text(relpath).splitlines():
            record = json.loads(line)
            if record["system"] in systems:
                by_prompt = answers.setdefault(record["combination"], {})
                by_prompt.setdefault(record["prompt"], {})[record["system"]] = record
        self.lines += ["### Example generations", ""]
        for key in evaluation["combinations"]:
            prompts = list(answers.get(key, {}).items())[:per_combination]
            rows = [
                [_cell_text(prompt, EXAMPLE_CHARS),
                 *[_example_cell(by_system.get(system)) for system in systems]]
                for prompt, by_system in prompts
            ]  # fmt: skip
            if rows:
                self.lines += [f"**{key}**", "", *_table(["prompt", *systems], rows)]

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


def _example_cell(record: dict[str, Any] | None) -> str:
    """A response for the examples table, with the tiny world's checkers' verdict."""
    if record is None:
        return "–"
    cell = _cell_text(record["response"], EXAMPLE_CHARS)
    shown = record.get("poles_shown")
    if shown is not None:
        cell += f"<br>*checkers: {', '.join(shown) or 'no pole'}*"
    return cell


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
    return {"path": rundir.locate(REPORT_PATH), "plots": [rundir.locate(p) for p in report.plots]}


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

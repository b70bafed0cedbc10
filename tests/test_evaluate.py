"""The evaluate and report stages: win rates, judges, tables and plots."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from judge_server import JudgeServer

from psoups_ray.artifacts import RunArtifacts
from psoups_ray.errors import ConfigError
from psoups_ray.evaluate import reward_outcome, share_outcome, win_rates
from psoups_ray.evaluate.stage import check_evaluate_config, system_query
from psoups_ray.pipeline import run_pipeline
from psoups_ray.rundir import RunDir

KEY_ENV = "PSOUPS_TEST_EVAL_JUDGE_KEY"
API_KEY = "sk-psoups-eval-9b2e77"
COMBOS = ["P2A+P3A", "P2A+P3B", "P2B+P3A", "P2B+P3B"]
SYSTEMS = ["base", "base+prompt", "rlhf", "pmorl", "psoups-uniform", "psoups-tuned"]


# -- win rates ------------------------------------------------------------------------------


def test_win_rates_count_ties_half_and_bootstrap_over_prompts():
    outcomes = np.array([[1.0, 1.0, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0]])  # (combinations, prompts)
    per_combination, overall = win_rates(outcomes, samples=2000, confidence=0.9, seed=0)
    first, second = per_combination
    assert first.win_rate == pytest.approx(0.625)
    assert (first.wins, first.ties, first.losses, first.n) == (2, 1, 1, 4)
    assert first.ci_low < first.win_rate < first.ci_high
    assert second.win_rate == second.ci_low == second.ci_high == 1.0  # no variation at all
    assert overall.win_rate == pytest.approx(0.8125) and overall.n == 8
    assert first.ci_low < overall.ci_low and overall.ci_high <= 1.0
    again = win_rates(outcomes, samples=2000, confidence=0.9, seed=0)[1]
    assert again == overall  # seeded
    wider = win_rates(outcomes, samples=2000, confidence=0.99, seed=0)[0][0]
    assert wider.ci_high - wider.ci_low > first.ci_high - first.ci_low
    many = win_rates(np.tile(outcomes[:1], 25), samples=2000, confidence=0.9, seed=0)[0][0]
    assert many.win_rate == pytest.approx(0.625)
    assert many.ci_high - many.ci_low < (first.ci_high - first.ci_low) / 3  # ~ 1/sqrt(n)
    with pytest.raises(ValueError, match="combinations, prompts"):
        win_rates(np.zeros(3), samples=10, confidence=0.9, seed=0)


def test_judge_outcomes():
    assert reward_outcome(0.50, 0.45, tie_threshold=0.1) == 0.5
    assert reward_outcome(0.50, 0.30, tie_threshold=0.1) == 1.0
    assert reward_outcome(-0.2, 0.30, tie_threshold=0.1) == 0.0
    assert reward_outcome(0.3, 0.2999, tie_threshold=0.0) == 1.0
    assert share_outcome(2 / 3, 2 / 3) == 0.5
    assert share_outcome(1.0, 2 / 3) == 1.0 and share_outcome(0.0, 1 / 3) == 0.0


def test_every_system_is_the_right_soup_query():
    from conftest import policy_test_config

    space = policy_test_config().space
    poles = ("P2A", "P3B")
    prompt = space.preference_prompt(space.combination(list(poles)))
    tuned = {"P2A": 0.7, "P3B": 0.3}
    queries = {s: system_query(s, poles, space, tuned, prompted=False) for s in SYSTEMS}
    assert (queries["base"].weights, queries["base"].preference_prompt) == ({}, None)
    assert (queries["base+prompt"].weights, queries["base+prompt"].preference_prompt) == (
        {},
        prompt,
    )
    assert queries["rlhf"].weights == {"rlhf": 1.0} and queries["rlhf"].preference_prompt is None
    assert queries["pmorl"].weights == {"pmorl": 1.0}
    assert queries["pmorl"].preference_prompt == prompt
    assert queries["psoups-uniform"].weights == {"P2A": 0.5, "P3B": 0.5}
    assert queries["psoups-tuned"].weights == tuned
    assert queries["psoups-tuned"].preference_prompt is None  # trained unprompted
    prompted = system_query("psoups-tuned", poles, space, tuned, prompted=True)
    assert prompted.preference_prompt == prompt
    assert all(query.scored == poles for query in queries.values())


def test_evaluate_config_is_validated(monkeypatch):
    from conftest import policy_test_config

    with pytest.raises(ConfigError, match="must include psoups-uniform or psoups-tuned"):
        policy_test_config("evaluate.systems=[base,rlhf]")
    with pytest.raises(ConfigError, match="lists a system twice"):
        policy_test_config("evaluate.systems=[base,base,psoups-tuned]")
    with pytest.raises(ConfigError, match="evaluate.systems.1: Input should be 'base'"):
        policy_test_config("evaluate.systems=[base,gpt4]")
    config = policy_test_config("policies.baselines=[pmorl]")
    with pytest.raises(ConfigError, match="'rlhf' needs the rlhf baseline policy"):
        check_evaluate_config(config)
    monkeypatch.delenv(KEY_ENV, raising=False)
    config = policy_test_config(
        f"evaluate.llm_judge.api_key_env={KEY_ENV}",
        "evaluate.llm_judge.base_url=localhost:1",
        "evaluate.llm_judge.criteria.P9Z=x",
    )
    with pytest.raises(ConfigError) as problems:
        check_evaluate_config(config)
    message = str(problems.value)
    assert f"evaluate.llm_judge.api_key_env: the environment variable {KEY_ENV}" in message
    assert "evaluate.llm_judge.base_url: 'localhost:1' must start with http://" in message
    assert "evaluate.llm_judge.criteria: 'P9Z' is not a pole" in message


# -- the stages ------------------------------------------------------------------------------


def _checker_rule(prompts_to_poles: dict[str, str]):
    """An LLM judge that answers like the tiny world's checkers, criterion by criterion."""
    from psoups_ray.world import exhibited_poles

    def rule(criterion: str, first: str, second: str) -> str:
        pole = prompts_to_poles[criterion]
        shown = pole in exhibited_poles(first), pole in exhibited_poles(second)
        return "tie" if shown[0] == shown[1] else ("1" if shown[0] else "2")

    return rule


def _config(server_url: str | None = None):
    from conftest import tuned_test_config

    overrides = ["evaluate.num_prompts=6"]
    if server_url:
        overrides += [
            f"evaluate.llm_judge.base_url={server_url}",
            f"evaluate.llm_judge.api_key_env={KEY_ENV}",
            "evaluate.llm_judge.model=checker-judge",
            "evaluate.llm_judge_prompts=3",
        ]
    return tuned_test_config(*overrides)


@pytest.fixture(scope="module")
def evaluated(tuned_run, tmp_path_factory):
    """The tuned run, evaluated (with an LLM judge on 127.0.0.1) and reported."""
    source, _ = tuned_run
    out = tmp_path_factory.mktemp("evaluate") / "run"
    shutil.copytree(source, out)
    space = _config().space
    rule = _checker_rule({space.pole(pole).prompt: pole for pole in space.pole_ids})
    with JudgeServer(rule=rule) as server, pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_ENV, API_KEY)
        manifest = run_pipeline(
            _config(server.url), str(out), ["evaluate", "report"], run_prerequisites=False
        )
        requests = list(server.requests)
    return out, manifest, requests


def _samples(out: Path) -> list[dict]:
    return [
        json.loads(line) for line in (out / "evaluation/samples.jsonl").read_text().splitlines()
    ]


@pytest.mark.integration
def test_every_system_answers_and_the_tables_follow_from_the_samples(evaluated):
    from psoups_ray.world import exhibited_poles

    out, manifest, _ = evaluated
    evaluation = manifest.data["evaluation"]
    assert manifest.is_complete("evaluate") and manifest.is_complete("report")
    assert evaluation["combinations"] == COMBOS and evaluation["systems"] == SYSTEMS
    assert evaluation["judges"] == ["reward", "attributes", "llm"]
    samples = _samples(out)
    assert len(samples) == len(COMBOS) * len(SYSTEMS) * 6
    by = {}
    for record in samples:
        by.setdefault((record["combination"], record["system"]), []).append(record)
        assert record["poles_shown"] == sorted(exhibited_poles(record["response"]))
    prompts = [r["prompt"] for r in by["P2A+P3A", "base"]]
    for (combo, _), records in by.items():
        assert [r["prompt"] for r in records] == prompts
        assert set(records[0]["rewards"]) == set(combo.split("+"))
    for system in ("base", "rlhf"):  # the same answers whatever the combination
        texts = {tuple(r["response"] for r in by[combo, system]) for combo in COMBOS}
        assert len(texts) == 1
    assert by["P2A+P3A", "base"] != by["P2A+P3A", "base+prompt"]

    tables = evaluation["win_rates"]
    for soup in ("psoups-uniform", "psoups-tuned"):
        for other in SYSTEMS:
            if other == soup:
                continue
            outcomes = {"reward": [], "attributes": []}
            for combo in COMBOS:
                poles = combo.split("+")
                mine, theirs = by[combo, soup], by[combo, other]
                reward = [
                    reward_outcome(
                        np.mean([a["rewards"][p] for p in poles]),
                        np.mean([b["rewards"][p] for p in poles]),
                        0.1,
                    )
                    for a, b in zip(mine, theirs, strict=True)
                ]
                shares = [
                    share_outcome(
                        len(set(poles) & set(a["poles_shown"])) / 2,
                        len(set(poles) & set(b["poles_shown"])) / 2,
                    )
                    for a, b in zip(mine, theirs, strict=True)
                ]
                for judge, row in (("reward", reward), ("attributes", shares)):
                    cell = tables[judge][soup][other]["combinations"][combo]
                    # rates are rounded to 4 decimals; rewards too in the file: allow a rare flip
                    tolerance = 0.1 if judge == "reward" else 1e-4
                    assert cell["win_rate"] == pytest.approx(np.mean(row), abs=tolerance)
                    outcomes[judge].append(row)
            cell = tables["attributes"][soup][other]["overall"]
            assert cell["win_rate"] == pytest.approx(np.mean(outcomes["attributes"]), abs=1e-4)
            assert cell["ci_low"] <= cell["win_rate"] <= cell["ci_high"]
            assert cell["n"] == len(COMBOS) * 6
    metrics = evaluation["metrics"]
    for (combo, system), records in by.items():
        wanted = set(combo.split("+"))
        success = np.mean([wanted <= set(r["poles_shown"]) for r in records])
        assert metrics[combo][system]["success_rate"] == pytest.approx(success)
    csv_lines = (out / "evaluation/win_rates.csv").read_text().splitlines()
    assert csv_lines[0].startswith("judge,soup,opponent,combination,win_rate,ci_low,ci_high")
    assert len(csv_lines) == 1 + 3 * 2 * 5 * (len(COMBOS) + 1)


@pytest.mark.integration
def test_the_soups_answers_are_reproduced_in_process(evaluated):
    """The samples are real generations: the same query, prompts and seed give the same
    responses (and rewards) outside Ray."""
    from psoups_ray.evaluate.stage import evaluation_prompts
    from psoups_ray.runtime.evaluator import SoupEvaluator
    from psoups_ray.runtime.queries import SoupModels
    from psoups_ray.seeding import derive_seed

    out, manifest, _ = evaluated
    config = _config()
    combo = "P2B+P3A"
    poles = tuple(combo.split("+"))
    own = [s for s in SYSTEMS if s not in ("base", "rlhf")]
    tuned = manifest.data["tuned_weights"][combo]
    queries = [system_query(s, poles, config.space, tuned, False) for s in own]
    run = RunArtifacts.load(out)
    prompts, _ = evaluation_prompts(config, run)
    models = SoupModels.from_run(run, config.rewards.max_length, False, ["rlhf", "pmorl"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the 1-CPU actor
    try:
        results = SoupEvaluator(models).sample(
            queries, prompts, config.evaluate.generation,
            derive_seed(config.seed, "evaluate", combo), poles,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    samples = _samples(out)
    for system, result in zip(own, results, strict=True):
        recorded = [r for r in samples if r["combination"] == combo and r["system"] == system]
        assert [r["response"] for r in recorded] == result["responses"]
        for pole in poles:
            assert [r["rewards"][pole] for r in recorded] == pytest.approx(
                result["rewards"][pole], abs=1e-3
            )


@pytest.mark.integration
def test_every_samples_request_posted_to_psoups_serve_returns_its_response(evaluated):
    """What is evaluated is what is served: each row's recorded request (the soup, the user
    message, the seed and the sampling settings) POSTed to the run's Serve app returns the
    row's response text. Every row of every soup system is asked, and one of each other
    system (base, base+prompt, the baselines served whole)."""
    import socket

    import httpx
    from ray import serve

    from psoups_ray.serve.app import bind_app

    out, _, _ = evaluated
    rows = _samples(out)
    chosen = [row for row in rows if row["system"] in ("psoups-uniform", "psoups-tuned")]
    for system in ("base", "base+prompt", "rlhf", "pmorl"):
        chosen.append(next(row for row in rows if row["system"] == system))
    assert all("request" in row for row in rows)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = bind_app(
        {"run": str(out), "max_tokens": 64, "max_batch_size": 4},
        {"SoupModel": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
         "Ingress": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}},
    )  # fmt: skip
    serve.run(app, name="psoups-evaluated", route_prefix="/evaluated")
    try:
        url = f"http://127.0.0.1:{port}/evaluated/v1/chat/completions"
        with httpx.Client(timeout=120) as client:
            for row in chosen:
                answer = client.post(url, json=row["request"])
                assert answer.status_code == 200, answer.text
                text = answer.json()["choices"][0]["message"]["content"]
                assert text == row["response"], (row["system"], row["combination"])
    finally:
        serve.delete("psoups-evaluated")
        serve.shutdown()  # the serve tests start Serve on a port of their own


@pytest.mark.integration
def test_the_llm_judge_is_asked_criterion_by_criterion(evaluated):
    out, manifest, requests = evaluated
    evaluation = manifest.data["evaluation"]
    llm = evaluation["llm_judge"]
    pairs = 2 * 5  # each soup against the five other systems
    questions = pairs * len(COMBOS) * 2 * 3  # x 2 criteria x 3 prompts
    assert llm["judged"] == questions
    # A question asked before (the same texts shown in the same order) is answered from
    # the run's cache, not sent again.
    assert len(requests) + llm["cache_hits"] == questions and len(requests) > questions / 2
    assert llm["model"] == "checker-judge" and llm["num_prompts"] == 3
    assert all(r["auth"] == f"Bearer {API_KEY}" for r in requests)
    # The judge answers like the checkers, one pole at a time: recompute its outcomes.
    by = {}
    for record in _samples(out):
        by.setdefault((record["combination"], record["system"]), []).append(record)
    soup, other = "psoups-tuned", "base+prompt"
    for combo in COMBOS:
        points = []
        for a, b in list(zip(by[combo, soup], by[combo, other], strict=True))[:3]:
            scores = []
            for pole in combo.split("+"):
                shown = pole in a["poles_shown"], pole in b["poles_shown"]
                scores.append(0.5 if shown[0] == shown[1] else float(shown[0]))
            points.append(np.mean(scores))
        cell = evaluation["win_rates"]["llm"][soup][other]["combinations"][combo]
        assert cell["win_rate"] == pytest.approx(np.mean(points), abs=1e-4)
    # Half the questions show the soup's response second (position bias cancels).
    assert 0.3 < llm["shown_b_first"] / llm["judged"] < 0.7
    for path in out.rglob("*"):  # the key is read from the environment, written nowhere
        if path.is_file():
            assert API_KEY.encode() not in path.read_bytes(), path


@pytest.mark.integration
def test_the_report_has_every_table_and_plot_and_rebuilds(evaluated, capsys):
    from psoups_ray.__main__ import main

    out, manifest, _ = evaluated
    report = (out / "report.md").read_text()
    for heading in (
        "## Configuration", "## Base model", "## Reward models", "## Policies",
        "## Tuned soups", "## Evaluation", "### psoups-tuned: win rate by the attributes judge",
        "### Attribute success", "### Mean normalised reward", "### Example generations",
    ):  # fmt: skip
        assert heading in report, heading
    header = "| combination | vs base | vs base+prompt | vs rlhf | vs pmorl | vs psoups-uniform |"
    assert header in report
    # What the tune trials maximised, with the references of the gains, as configured.
    references = manifest.data["tune"]["references"]
    ends = ", ".join(f"{p} {r['base']:+.2f} → {r['policy']:+.2f}" for p, r in references.items())
    assert (
        "trials maximised the worst of the poles' gains over the base (0: the base, 1: the "
        f"pole's own policy; reward base → policy on the trial prompts: {ends}), the weights' "
        "total searched from 1 to 3."
    ) in report
    plots = [manifest.rundir.resolve(p) for p in manifest.data["report"]["plots"]]
    names = sorted(Path(p).name for p in plots)
    assert names == [
        "pareto_fronts.png", "reward_curves.png", "win_rates_attributes_psoups-tuned.png",
        "win_rates_llm_psoups-tuned.png", "win_rates_reward_psoups-tuned.png",
    ]  # fmt: skip
    for path in plots:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({Path(path).relative_to(out)})" in report  # linked relatively
    config_before = json.loads((out / "manifest.json").read_text())["config"]
    (out / "report.md").unlink()
    assert main(["report", "--run", str(out)]) == 0
    assert (out / "report.md").read_text().startswith("# P-Soups report")
    after = json.loads((out / "manifest.json").read_text())
    assert after["config"] == config_before  # rebuilding reads no config
    assert after["stages"]["report"]["status"] == "complete"
    assert main(["report", "--run", str(out / "nowhere")]) == 2
    assert "is not a psoups run directory" in capsys.readouterr().err


# -- the text judges, on hand-written responses ----------------------------------------------

PROMPTS = ["How long do I boil an egg?", "Why is the sky blue?", "When does water boil?"]
# Friendly and rude answers of about the same length: the text judges prefer the friendly
# one for P3A, the rude one for P3B, and tie them on conciseness (P2A).
FRIENDLY = [
    "Hi friend! Boil the egg for eight minutes. Hope this helps!",
    "Great question!\nBlue light | scatters most in the air. Have fun looking up!",
    "Happy to help! Water boils at one hundred degrees. Enjoy!",
]
RUDE = [
    "Obviously, boil the egg for eight minutes. Google it, duh.",
    "Everyone knows this. Blue light scatters most, duh. Stop asking.",
    "Whatever. Water boils at one hundred degrees. Look it up.",
]
TEXT_COMBOS = ["P2A+P3A", "P2A+P3B"]
POLES = ["P2A", "P3A", "P3B"]


def _hand_written(texts: list[str]):
    from psoups_ray.evaluate.stage import Responses

    return Responses(texts=texts, rewards={pole: [0.0] * len(texts) for pole in POLES}, shown=None)


def test_the_text_judge_decides_criterion_by_criterion():
    from psoups_ray.evaluate.llm import criterion_outcomes, text_judgements
    from psoups_ray.judges.text import TextJudge

    combinations = [("P3A",), ("P3B",), ("P3A", "P3B"), ("P2A", "P3A")]
    responses = {
        "+".join(poles): {"soup": _hand_written(FRIENDLY), "base": _hand_written(RUDE)}
        for poles in combinations
    }
    outcomes = criterion_outcomes(
        TextJudge(), "text", combinations, PROMPTS, responses, [("soup", "base")]
    )
    # friendly wins P3A (1), loses P3B (0); opposite poles average to 0.5; P2A ties (0.5)
    expected = [[1.0] * 3, [0.0] * 3, [0.5] * 3, [0.75] * 3]  # (combinations, prompts)
    assert outcomes["soup", "base"].tolist() == expected
    judged, success, described = text_judgements(
        combinations, PROMPTS, responses, [("soup", "base")]
    )
    assert judged["soup", "base"].tolist() == expected
    assert success["P3A"] == {"soup": {"P3A": 1.0}, "base": {"P3A": 0.5}}  # base ties itself
    assert success["P2A+P3A"]["soup"] == {"P2A": 0.5, "P3A": 1.0}
    assert success["P3B"]["soup"] == {"P3B": 0.0}
    assert described["type"] == "text" and described["num_prompts"] == 3
    # every (pole, prompt) once for the outcomes, once per system for the success
    assert described["judged"] == 3 * 6 + 2 * 3 * 6
    without_base = {key: {"soup": answers["soup"]} for key, answers in responses.items()}
    assert text_judgements(combinations, PROMPTS, without_base, [])[1] == {}


def test_a_policys_text_judge_win_rate_is_per_pole_over_the_queries_asking_for_it():
    from psoups_ray.judges.text import TextJudge
    from psoups_ray.policies.job import pole_verdicts, win_rates
    from psoups_ray.policies.trainer import Query

    queries = [  # like the rlhf baseline's: the first asks for both style poles
        Query(PROMPTS[0], None, ("P3A", "P3B")),
        Query(PROMPTS[1], None, ("P3A",)),
        Query(PROMPTS[2], None, ("P3B",)),
    ]
    policy = [FRIENDLY[0], FRIENDLY[1], RUDE[2]]
    # P3A: friendly beats rude twice; P3B: rude wins the first query, the third ties
    verdicts = pole_verdicts(TextJudge(), queries, policy, RUDE)
    assert win_rates(verdicts) == {"P3A": 1.0, "P3B": 0.25}


@pytest.fixture
def text_judged_run(tmp_path, monkeypatch):
    """An evaluate stage (base and the tuned soup, text judge on) and its report, on the
    hand-written responses: generation and model loading are replaced, the rest is real."""
    from types import SimpleNamespace

    from conftest import policy_test_config

    from psoups_ray.evaluate import stage
    from psoups_ray.judges.text import TextJudge
    from psoups_ray.manifest import Manifest
    from psoups_ray.policies.job import pole_verdicts, reward_judge_agreement, win_rates
    from psoups_ray.policies.trainer import Query
    from psoups_ray.report.build import build_report

    config = policy_test_config(
        "evaluate.text_judge=true", "evaluate.systems=[base,psoups-tuned]",
        "evaluate.bootstrap_samples=50",
    )  # fmt: skip
    rundir = RunDir(tmp_path / "run")
    manifest = Manifest.open(rundir, config.model_dump(mode="json"), config.space.to_dict())
    manifest.data["tuned_weights"] = {key: {p: 0.5 for p in key.split("+")} for key in TEXT_COMBOS}
    queries = [Query(prompt, None, ("P3A",)) for prompt in PROMPTS]
    verdicts = pole_verdicts(TextJudge(), queries, FRIENDLY, RUDE)
    win_rate = win_rates(verdicts)
    # The text judge prefers every friendly answer; the reward model ranks two of three so.
    agreement = reward_judge_agreement(verdicts, {"P3A": [1.0, 1.0, -1.0]}, {"P3A": [0.0] * 3})
    manifest.data["policies"] = {
        "P3A": {
            "kind": "pole",
            "metrics": {
                "episodes": 96,
                "eval": {
                    "base": {"reward": 0.0},
                    "policy": {
                        "reward": 0.5,
                        "kl_to_reference": 1.0,
                        "text_judge_win_rate": win_rate,
                        "reward_judge_agreement": agreement,
                    },
                },
            },
        },  # fmt: skip
    }
    manifest.save()
    answers = {
        key: {"base": _hand_written(RUDE), "psoups-tuned": _hand_written(FRIENDLY)}
        for key in TEXT_COMBOS
    }
    monkeypatch.setattr(stage, "evaluation_prompts", lambda *args: (PROMPTS, 0))
    models = SimpleNamespace(from_run=lambda *args: SimpleNamespace(attributes=None))
    monkeypatch.setattr(stage, "SoupModels", models)
    monkeypatch.setattr(stage, "_generate", lambda *args: (answers, []))
    sections = stage.run_evaluate_stage(config, rundir)
    manifest.data["evaluation"] = sections["evaluation"]
    manifest.save()
    build_report(rundir)
    return rundir, sections["evaluation"]


def test_the_text_judge_is_a_judge_of_the_evaluation_with_success_against_base(text_judged_run):
    rundir, evaluation = text_judged_run
    assert evaluation["judges"] == ["reward", "text"]
    rates = evaluation["win_rates"]["text"]["psoups-tuned"]["base"]["combinations"]
    assert rates["P2A+P3A"]["win_rate"] == 0.75 and rates["P2A+P3B"]["win_rate"] == 0.25
    assert evaluation["text_judge"]["type"] == "text"
    metrics = evaluation["metrics"]["P2A+P3B"]
    assert metrics["base"]["text_success"] == {"P2A": 0.5, "P3B": 0.5}
    assert metrics["psoups-tuned"]["text_success"] == {"P2A": 0.5, "P3B": 0.0}
    assert metrics["psoups-tuned"]["text_success_mean"] == 0.25
    overall = evaluation["metrics_overall"]
    assert overall["base"]["text_success_mean"] == 0.5
    assert overall["psoups-tuned"]["text_success_mean"] == 0.5  # (0.75 + 0.25) / 2
    assert "text_success" not in overall["base"] and "rewards" not in overall["base"]
    rows = list(csv.DictReader(io.StringIO(rundir.read_text("evaluation/metrics.csv"))))
    assert [(row["combination"], row["system"]) for row in rows] == [
        (key, system) for key in TEXT_COMBOS for system in ("base", "psoups-tuned")
    ]
    tuned = rows[1]
    assert (tuned["text_success_P2A"], tuned["text_success_P3A"]) == ("0.5", "1.0")
    assert (tuned["text_success_mean"], tuned["text_success_P3B"]) == ("0.75", "")
    assert tuned["reward_P3A"] == "0.0" and "rewards" not in tuned


def test_the_report_has_the_text_judge_tables_and_example_generations(text_judged_run):
    rundir, _ = text_judged_run
    report = rundir.read_text("report.md")
    assert "### psoups-tuned: win rate by the programmatic text judges" in report
    assert "| P2A+P3A | 75% [" in report
    assert "![psoups-tuned win rates (programmatic text judges)]" in report
    # Real text has no attribute checkers: no "target success" column.
    assert "| policy | reward base → policy | KL to base | PPO episodes | train time | " \
        "text judge win rate vs base | reward model agrees with judge (decided pairs) |" \
        in report  # fmt: skip
    assert "| 1.0 | 96 | 0 s | P3A 100% | P3A 67% (3) |" in report
    assert "### Text judge success vs base" in report
    success = report.split("### Text judge success vs base")[1]
    assert "| system | P2A | P3B | mean |\n|---|---|---|---|\n| base | 50% | 50% | 50% |\n" \
        "| psoups-tuned | 50% | 0% | 25% |" in success  # fmt: skip
    examples = report.split("### Example generations")[1]
    assert "| prompt | base | psoups-tuned |" in examples
    assert f"| {PROMPTS[0]} | {RUDE[0]} | {FRIENDLY[0]} |" in examples
    # the pipe escaped, the line break kept as <br>, the third prompt left out
    assert "| Great question!<br>Blue light \\| scatters most" in examples
    assert examples.count(PROMPTS[1]) == len(TEXT_COMBOS) and PROMPTS[2] not in examples


def test_example_cells_are_cut_and_escaped():
    from psoups_ray.report.build import _cell_text

    assert _cell_text("a|b\\c\n\n<d>", 100) == "a\\|b\\\\c<br><br>&lt;d&gt;"
    cut = _cell_text("word " * 200, 400)
    assert len(cut) <= 402 and cut.endswith(" …")

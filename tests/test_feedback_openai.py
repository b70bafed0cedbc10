"""The OpenAI-compatible judge against a real HTTP server on 127.0.0.1 started by the test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from judge_server import MARKER, JudgeServer

from psoups_ray.config import OpenAIJudgeSpec
from psoups_ray.errors import PsoupsError
from psoups_ray.judges import PairToJudge
from psoups_ray.judges.openai import JudgeCache, OpenAIJudge, parse_answer
from psoups_ray.rundir import RunDir

API_KEY = "sk-psoups-test-4f9a1c"
KEY_ENV = "PSOUPS_TEST_JUDGE_KEY"
CRITERIA = {"P3A": "Be friendly.", "P3B": "Be unfriendly."}


@pytest.fixture
def server():
    with JudgeServer() as running:
        yield running


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, API_KEY)


def make_judge(server: JudgeServer, cache: JudgeCache | None = None, **spec: Any) -> OpenAIJudge:
    settings = {"base_url": server.url, "model": "judge-model", "api_key_env": KEY_ENV, **spec}
    return OpenAIJudge(OpenAIJudgeSpec(**settings), CRITERIA, seed=0, cache=cache, backoff_s=0.001)


def pairs_with_answers(n: int) -> tuple[list[PairToJudge], list[str]]:
    """Pairs where the friendly response is ``a`` for odd indices, ``b`` for even ones."""
    pairs, verdicts = [], []
    for index in range(n):
        good, bad = f"{MARKER} answer {index}", f"plain answer {index}"
        a, b = (good, bad) if index % 2 else (bad, good)
        pairs.append(PairToJudge(f"Question {index}?", a, b))
        verdicts.append("a" if index % 2 else "b")
    return pairs, verdicts


def test_verdicts_are_right_whichever_position_the_preferred_response_had(server):
    pairs, expected = pairs_with_answers(40)
    with make_judge(server, concurrency=4) as judge:
        assert judge.compare_batch("P3A", pairs) == expected
        stats = judge.describe()
    assert len(server.requests) == 40
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == f"Bearer {API_KEY}"
    assert request["body"]["model"] == "judge-model"
    assert "Criterion: Be friendly." in request["body"]["messages"][-1]["content"]
    # Positions are randomised: a was shown first for some pairs, b for others.
    shown_a_first = [first in {p.a for p in pairs} for first in server.shown_first()]
    assert 5 < sum(shown_a_first) < 35
    assert 5 < stats["shown_b_first"] < 35
    # ... and the preferred response came first sometimes, second other times.
    marker_first = [MARKER in first for first in server.shown_first()]
    assert 5 < sum(marker_first) < 35
    assert stats["requests"] == 40 and stats["unparseable"] == 0
    assert "sk-" not in json.dumps(stats)


def test_position_is_seeded_per_pair(server):
    pairs, _ = pairs_with_answers(10)
    first, second = make_judge(server), make_judge(server)
    assert [first.shows_b_first("P3A", p) for p in pairs] == [
        second.shows_b_first("P3A", p) for p in pairs
    ]


def test_server_errors_and_rate_limits_are_retried(server):
    server.script = [(500, "internal error"), (429, '{"error": "slow down"}')]
    judge = make_judge(server, max_retries=3)
    assert judge.compare("P3A", "Hi?", "plain", f"{MARKER} hi") == "b"
    assert len(server.requests) == 3
    assert judge.describe()["retries"] == 2


def test_retries_give_up_after_max_retries(server):
    server.script = [(503, "unavailable")] * 3
    judge = make_judge(server, max_retries=2)
    with pytest.raises(PsoupsError, match=r"failed after 3 attempt\(s\).*HTTP 503"):
        judge.compare("P3A", "Hi?", "a", "b")
    assert len(server.requests) == 3


def test_connection_errors_are_retried_then_reported():
    with JudgeServer() as gone:
        url = gone.url  # a port nothing listens on once the server has closed
    spec = OpenAIJudgeSpec(base_url=url, api_key_env=KEY_ENV, max_retries=1, timeout_s=2)
    judge = OpenAIJudge(spec, CRITERIA, backoff_s=0.001)
    with pytest.raises(PsoupsError, match=r"failed after 2 attempt\(s\).*ConnectError"):
        judge.compare("P3A", "Hi?", "a", "b")


def test_client_errors_fail_fast_with_status_and_body(server):
    server.script = [(400, '{"error": {"message": "unknown model judge-model"}}')]
    judge = make_judge(server, max_retries=5)
    with pytest.raises(PsoupsError) as info:
        judge.compare("P3A", "Hi?", "a", "b")
    assert "HTTP 400" in str(info.value) and "unknown model judge-model" in str(info.value)
    assert API_KEY not in str(info.value)
    assert len(server.requests) == 1


def test_an_endpoint_that_wants_max_completion_tokens_gets_it(server):
    """Reasoning models refuse max_tokens for max_completion_tokens: the judge asks again
    with it, and sends it from then on."""
    server.refuse_max_tokens = True
    pairs, expected = pairs_with_answers(6)
    judge = make_judge(server, max_retries=0, concurrency=1)  # one request at a time
    assert judge.compare_batch("P3A", pairs) == expected
    bodies = [request["body"] for request in server.requests]
    assert "max_tokens" in bodies[0] and len(bodies) == 7  # one refused, then one per pair
    assert all("max_tokens" not in b and b["max_completion_tokens"] == 16 for b in bodies[1:])


def test_unparseable_answers_are_ties_and_counted(server):
    judge = make_judge(server)
    assert judge.compare("P3A", "Hi?", "UNSURE one", "another") == "tie"
    assert judge.compare("P3A", "Hi?", "neither", "nor this") == "tie"
    assert judge.describe()["unparseable"] == 1


@pytest.mark.parametrize(
    "reply,answer",
    [
        ("1", "1"),
        (" 2.\n", "2"),
        ("Tie", "tie"),
        ("Response 1", "1"),
        ("**2**", "2"),
        ('"tie"', "tie"),
        ("I think 1", "unparseable"),
        ("", "unparseable"),
        ("12", "unparseable"),
    ],
)
def test_parse_answer(reply, answer):
    assert parse_answer(reply) == answer


def test_missing_api_key_is_a_clear_error(monkeypatch, server):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(PsoupsError, match=f"API key in the environment variable {KEY_ENV}"):
        make_judge(server)


def test_cache_makes_an_interrupted_labelling_pay_only_once(server, tmp_path):
    run = tmp_path / "run"
    pairs, expected = pairs_with_answers(10)
    # First run: the 7th request is refused (say, a quota): 6 labels are paid for.
    server.script = [None] * 6 + [(403, "quota exceeded")]
    judge = make_judge(server, cache=JudgeCache(RunDir(run), flush_every=4), concurrency=1)
    with pytest.raises(PsoupsError, match="HTTP 403"):
        judge.compare_batch("P3A", pairs)
    assert len(server.requests) == 7

    # Second run: the 6 cached answers are not asked again.
    judge = make_judge(server, cache=JudgeCache(RunDir(run)), concurrency=3)
    assert judge.compare_batch("P3A", pairs) == expected
    assert len(server.requests) == 7 + 4
    assert judge.describe()["cache_hits"] == 6

    # Third run: everything is cached, no request at all.
    with make_judge(server, cache=JudgeCache(RunDir(run))) as judge:
        assert judge.compare_batch("P3A", pairs) == expected
    assert len(server.requests) == 11
    assert (run / "feedback" / "judge_cache.jsonl").is_file()
    assert_key_not_written(run)


def assert_key_not_written(run: Path) -> None:
    files = [path for path in run.rglob("*") if path.is_file()]
    assert files
    for path in files:
        assert API_KEY.encode() not in path.read_bytes(), f"the API key leaked into {path}"

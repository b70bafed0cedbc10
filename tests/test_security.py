"""Security properties of the package: no pickled artifacts, no remote code unless the
config allows it, no secret in what is written or logged, services bound to loopback."""

from __future__ import annotations

import ast
import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from judge_server import MARKER, JudgeServer

import psoups_ray
from psoups_ray.__main__ import build_parser, main
from psoups_ray.artifacts import BaseArtifact
from psoups_ray.config import BaseConfig, RayConfig, builtin_config_names, load_config
from psoups_ray.errors import PsoupsError
from psoups_ray.evaluate.llm import LLM_CACHE_PATH, llm_outcomes
from psoups_ray.judges.openai import JudgeCache, OpenAIJudge, judge_criteria
from psoups_ray.manifest import MANIFEST_NAME, Manifest
from psoups_ray.pipeline import describe_plan, preflight_problems
from psoups_ray.rundir import RunDir
from psoups_ray.runtime.loading import load_causal_lm, load_tokenizer

PACKAGE = Path(psoups_ray.__file__).parent
REPO = PACKAGE.parent


def dotted(node: ast.expr) -> str:
    """``torch.load`` for the expression ``torch.load``; ``""`` for anything not a name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        owner = dotted(node.value)
        return f"{owner}.{node.attr}" if owner else node.attr
    return ""


def package_calls() -> Iterator[tuple[str, ast.Call]]:
    """Every call in the package's source: (file relative to the package, call node)."""
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20, "the package's source was not found"
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call):
                yield str(path.relative_to(PACKAGE)), node


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def where(file: str, call: ast.Call) -> str:
    return f"psoups_ray/{file}:{call.lineno}"


# --- no pickles -------------------------------------------------------------------------------

UNPICKLERS = {"load", "loads", "Unpickler", "read_pickle"}
PICKLE_MODULES = {"pickle", "cloudpickle", "dill", "joblib", "pandas", "pd"}
# ray_utils.py hands Ray Train the stage's training loop: the driver pickles the function it
# is running and the worker Ray started for it unpickles those bytes from its own in-memory
# train_loop_config. No file or artifact is ever unpickled.
ALLOWED_UNPICKLING = {("ray_utils.py", "cloudpickle.loads")}


def test_torch_load_only_ever_loads_weights():
    loads = [(f, call) for f, call in package_calls() if dotted(call.func) == "torch.load"]
    assert loads, "no torch.load found: the scan is broken (policies/job.py restores with one)"
    for file, call in loads:
        value = keyword(call, "weights_only")
        assert isinstance(value, ast.Constant) and value.value is True, (
            f"{where(file, call)}: torch.load must pass weights_only=True (a checkpoint is data, "
            "never code to run)"
        )


def test_no_artifact_is_unpickled():
    found = set()
    for file, call in package_calls():
        name = dotted(call.func)
        module, _, function = name.rpartition(".")
        if function in UNPICKLERS and module.rpartition(".")[2] in PICKLE_MODULES:
            found.add((file, name))
        allow_pickle = keyword(call, "allow_pickle")
        assert not (isinstance(allow_pickle, ast.Constant) and allow_pickle.value), where(
            file, call
        )
    assert found == ALLOWED_UNPICKLING
    for path in PACKAGE.rglob("*.py"):  # `from pickle import load` would hide from the above
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in PICKLE_MODULES:
                assert not {alias.name for alias in node.names} & UNPICKLERS, path


# --- no remote code -----------------------------------------------------------------------------

# The package's own loaders, and the position of their trust_remote_code argument.
WRAPPERS = {"load_tokenizer": 2, "load_causal_lm": 3}
# The runtime's loaders of a run's base: the base artifact they take carries the run's
# trust_remote_code (and revision) to the wrappers above.
RUN_LOADERS = ("load_base_model", "load_base_tokenizer")


def remote_code_argument(call: ast.Call, name: str) -> ast.expr | None:
    """What a loader call passes as trust_remote_code: the keyword, the positional argument
    of the package's wrappers, or a ``**options`` expansion (load_options' dict)."""
    value = keyword(call, "trust_remote_code")
    if value is not None:
        return value
    position = WRAPPERS.get(name.rpartition(".")[2])
    if position is not None and len(call.args) > position:
        return call.args[position]
    return next((k.value for k in call.keywords if k.arg is None), None)


def test_trust_remote_code_is_off_unless_the_config_turns_it_on():
    assert BaseConfig().trust_remote_code is False
    names = builtin_config_names()
    assert names, "no built-in configs found"
    for name in names:
        assert load_config(name).base.trust_remote_code is False, name
    for loader in (load_tokenizer, load_causal_lm):
        assert inspect.signature(loader).parameters["trust_remote_code"].default is False
    assert BaseArtifact("m", "t").load_options() == {"revision": None, "trust_remote_code": False}


def test_every_model_and_tokenizer_loader_passes_the_configs_trust_remote_code():
    """Every ``Auto*.from_pretrained`` and every call of the package's own loaders, in
    every stage: a model with its own code must load wherever the run loads its base."""
    gaps, loaders, run_loaders = [], 0, 0
    for file, call in package_calls():
        name = dotted(call.func)
        if name.rpartition(".")[2] in RUN_LOADERS:
            run_loaders += 1
            continue
        is_auto = name.startswith("Auto") and name.endswith(".from_pretrained")
        if not (is_auto or name.rpartition(".")[2] in WRAPPERS):
            continue  # PeftModel.from_pretrained reads an adapter config: it runs no code
        loaders += 1
        value = remote_code_argument(call, name)
        if value is None:
            gaps.append(f"{where(file, call)}: {name}")
        else:
            assert not isinstance(value, ast.Constant), (
                f"{where(file, call)}: trust_remote_code must come from the config, not a literal"
            )
    # Every stage loads its base through the runtime: the direct loaders left are the
    # runtime's own, the base stage's (reference checks, GGUF) and the reward trainer's.
    assert loaders >= 8 and run_loaders >= 10, "the scan found too few loader calls: broken"
    assert not gaps, "loaders ignoring base.trust_remote_code:\n" + "\n".join(gaps)


# --- secrets ------------------------------------------------------------------------------------

SECRET = "sk-psoups-canary-7Q2x9Z4w"
KEY_ENV = "PSOUPS_SECURITY_TEST_KEY"


@pytest.fixture
def server():
    with JudgeServer() as running:
        yield running


@pytest.fixture
def judge_overrides(monkeypatch, server) -> list[str]:
    """Both LLM judges configured, their key in the environment."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    judge = f"{{base_url: '{server.url}', model: judge-model, api_key_env: {KEY_ENV}}}"
    return [
        "feedback.source=generate",
        "feedback.judge=openai",
        f"feedback.openai={judge}",
        f"evaluate.llm_judge={judge}",
    ]


def test_the_judge_key_is_in_no_manifest_dump_log_or_cache(
    judge_overrides, server, tmp_path, capsys, caplog
):
    config = load_config(None, judge_overrides)
    rundir = RunDir(tmp_path / "run")
    written = []

    manifest = Manifest.open(rundir, config.model_dump(mode="json"), config.space.to_dict())
    criteria = judge_criteria(config.feedback.openai, config.space)
    with OpenAIJudge(config.feedback.openai, criteria, cache=JudgeCache(rundir)) as judge:
        assert judge.compare("P3A", "Hi?", "plain", f"{MARKER} hi") == "b"
        server.script = [(401, f'{{"error": "invalid key {SECRET}"}}')]  # a server echoing it
        with pytest.raises(PsoupsError) as refused:
            judge.compare("P3A", "Bye?", "a", "b")
        manifest.fail_stage("feedback", str(refused.value))
        manifest.complete_stage("feedback", {"judge": judge.describe()}, seconds=1.0)
        written += [repr(judge), json.dumps(judge.describe())]
    responses = {"P1A": {s: SimpleNamespace(texts=["a", "b"]) for s in ("soup", "base")}}
    outcomes, described = llm_outcomes(
        config, rundir, [("P1A",)], ["Hi?", "Why?"], responses, [("soup", "base")]
    )
    written += [
        rundir.read_text(MANIFEST_NAME),
        rundir.read_text(LLM_CACHE_PATH),
        json.dumps(described),
        repr(config),
        "\n".join(describe_plan(config) + preflight_problems(config)),
    ]
    overrides = [argument for override in judge_overrides for argument in ("--set", override)]
    assert main(["config", *overrides]) == 0
    assert main(["validate", *overrides]) == 0
    captured = capsys.readouterr()
    written += [captured.out, captured.err, caplog.text]
    assert KEY_ENV in captured.out  # the dump names the variable...
    for text in written:
        assert SECRET not in text  # ... and nothing holds its value
    assert server.requests[0]["auth"] == f"Bearer {SECRET}"  # it was sent where it belongs


# --- network exposure ---------------------------------------------------------------------------

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def test_the_dashboard_and_serve_bind_loopback_by_default():
    assert RayConfig().dashboard_host == "127.0.0.1"
    for name in builtin_config_names():
        assert load_config(name).ray.dashboard_host == "127.0.0.1", name
    assert build_parser().parse_args(["serve", "--run", "runs/tiny"]).host == "127.0.0.1"


def test_shipped_serve_configs_bind_loopback_or_require_a_token():
    files = sorted((REPO / "serve_configs").glob("*.yaml"))
    assert files, "no serve configs found: the glob is wrong"
    for path in files:
        data = yaml.safe_load(path.read_text())
        host = data["http_options"]["host"]
        if host not in LOOPBACK:
            apps = data["applications"]
            assert all(app["args"].get("auth_token_env") for app in apps), (
                f"{path.name} serves on {host} without auth_token_env"
            )

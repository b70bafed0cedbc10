"""Load generator and serving benchmark for the psoups Serve app (127.0.0.1 only).

Drive a running endpoint:

    python bench/serve_load.py load --url http://127.0.0.1:8000 --concurrency 8 --requests 64

prints throughput, latency percentiles (p50/p95/p99) and the error count; the load is
bounded by ``--requests`` and ``--duration``.

Benchmark a run end to end (starts its own local Ray cluster and the app, then stops
them):

    python bench/serve_load.py bench --run runs/tiny            # --smoke-test: tiny sizes

measures, in one run on one machine: (1) ``mixing`` throughput with 8 concurrent
requests for 8 different combinations vs all for one combination (ratio, target >= 0.7);
(2) single-request latency over HTTP vs an in-process ``SoupEngine.generate`` of the same
tokens (ratio, target <= 1.3); (3) autoscaling: under sustained load the SoupModel replica
count rises above ``min_replicas`` and falls back afterwards (logged with timestamps).
(4) ``mixing`` vs ``merged`` (cache of 2 merged copies) throughput for the 8
combinations (target >= 3). Throughput phases use one replica of each strategy.

Kill a model replica under load (the app runs on a local Ray cluster):

    python bench/serve_load.py fault --url http://127.0.0.1:8000 --app psoups

keeps ``--concurrency`` clients sending small requests, SIGKILLs one ``SoupModel`` replica
of ``--app`` after ``--kill-after`` seconds, and prints requests sent, failed, failed while
in flight at the kill, max latency and the seconds from the kill until a request sent
after it succeeded (Serve's replacement replica, or the other replicas, took over).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUESTIONS = ["What is salt?", "How do volcanoes work?", "Why is the sky blue?", "What is rain?"]


def _check_local(url: str) -> None:
    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to load-test {host}: this tool only targets 127.0.0.1")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def run_load(
    url: str,
    models: list[str],
    concurrency: int,
    requests: int,
    duration: float,
    max_tokens: int,
    api_key: str | None = None,
) -> dict[str, float]:
    """``requests`` chat completions (at most ``duration`` seconds), ``concurrency`` at a
    time, cycling through ``models``; returns throughput and latency statistics."""
    import httpx

    _check_local(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    latencies: list[float] = []
    tokens = 0
    errors = 0
    counter = itertools.count()
    deadline = time.monotonic() + duration

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        while time.monotonic() < deadline:
            index = next(counter)
            if index >= requests:
                return
            body = {
                "model": models[index % len(models)],
                "messages": [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
                "max_tokens": max_tokens,
                "seed": index,
            }
            started = time.monotonic()
            try:
                response = await client.post(f"{url}/v1/chat/completions", json=body)
                if response.status_code != 200:
                    errors += 1
                    continue
                tokens += response.json()["usage"]["completion_tokens"]
                latencies.append(time.monotonic() - started)
            except httpx.HTTPError:
                errors += 1

    started = time.monotonic()
    async with httpx.AsyncClient(headers=headers, timeout=300) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "tokens_per_s": tokens / elapsed,
        "p50_s": _percentile(latencies, 50),
        "p95_s": _percentile(latencies, 95),
        "p99_s": _percentile(latencies, 99),
    }


class Attempt(NamedTuple):
    """One request of the fault run: when it was sent and answered, and how."""

    sent: float  # time.monotonic()
    finished: float
    ok: bool  # HTTP 200
    timed_out: bool  # no answer within the client timeout


def replica_pids(app: str, address: str | None = None) -> list[int]:
    """PIDs of ``app``'s live SoupModel replicas (Serve names a replica's actor class
    ``ServeReplica:<app>:<deployment>``); ``address``: the Ray cluster, default: auto."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=address,
        filters=[("class_name", "=", f"ServeReplica:{app}:SoupModel"), ("state", "=", "ALIVE")],
        limit=100,
    )
    return sorted(actor.pid for actor in actors if actor.pid)


async def run_fault(
    url: str,
    kill: Callable[[], None],
    models: list[str],
    concurrency: int,
    kill_after: float,
    recovery_timeout: float,
    settle: float,
    max_tokens: int,
    api_key: str | None = None,
    timeout: float = 150,
) -> dict[str, float]:
    """``concurrency`` clients send chat completions back to back; ``kill()`` runs after
    ``kill_after`` seconds; the load goes on until a request sent after the kill succeeds
    (or ``recovery_timeout`` passes), then ``settle`` seconds more."""
    import httpx

    _check_local(url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    attempts: list[Attempt] = []
    counter = itertools.count()
    stop, recovered = asyncio.Event(), asyncio.Event()
    killed_at = float("inf")

    async def worker(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            index = next(counter)
            body = {
                "model": models[index % len(models)],
                "messages": [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
                "max_tokens": max_tokens,
                "seed": index,
            }
            sent, ok, timed_out = time.monotonic(), False, False
            try:
                response = await client.post(f"{url}/v1/chat/completions", json=body)
                ok = response.status_code == 200
            except httpx.TimeoutException:
                timed_out = True
            except httpx.HTTPError:
                pass
            attempts.append(Attempt(sent, time.monotonic(), ok, timed_out))
            if ok and sent >= killed_at:
                recovered.set()

    async def chaos() -> None:
        nonlocal killed_at
        await asyncio.sleep(kill_after)
        killed_at = time.monotonic()
        kill()
        try:
            await asyncio.wait_for(recovered.wait(), recovery_timeout)
            await asyncio.sleep(settle)
        except asyncio.TimeoutError:
            pass
        stop.set()

    async with httpx.AsyncClient(headers=headers, timeout=timeout) as client:
        await asyncio.gather(chaos(), *(worker(client) for _ in range(concurrency)))
    failed = [a for a in attempts if not a.ok]
    after = [a.finished - killed_at for a in attempts if a.ok and a.sent >= killed_at]
    return {
        "sent": len(attempts),
        "failed": len(failed),
        "in_flight_at_kill": sum(a.sent < killed_at <= a.finished for a in attempts),
        "failed_in_flight": sum(a.sent < killed_at <= a.finished for a in failed),
        "failed_before_kill": sum(a.finished < killed_at for a in failed),
        "failed_after_kill": sum(a.sent >= killed_at for a in failed),
        "timeouts": sum(a.timed_out for a in attempts),
        "max_latency_s": max((a.finished - a.sent for a in attempts), default=float("nan")),
        "max_failed_latency_s": max((a.finished - a.sent for a in failed), default=0.0),
        "recovery_s": min(after, default=float("nan")),
    }


def fault(args: argparse.Namespace) -> int:
    pids = [args.pid] if args.pid else replica_pids(args.app, args.ray_address)
    if not pids:
        raise SystemExit(f"no live SoupModel replica of app {args.app!r} on this Ray cluster")
    stats = asyncio.run(
        run_fault(args.url, lambda: os.kill(pids[0], signal.SIGKILL),
                  args.model or ["psoups:base"], args.concurrency, args.kill_after,
                  args.recovery_timeout, args.settle, args.max_tokens, args.api_key,
                  args.timeout)
    )  # fmt: skip
    stats["killed_pid"] = pids[0]
    print(
        f"fault: {stats['sent']} requests sent, {stats['failed']} failed "
        f"({stats['failed_in_flight']} of the {stats['in_flight_at_kill']} in flight at the "
        f"kill, {stats['failed_after_kill']} sent after it), {stats['timeouts']} timed out; "
        f"max latency {stats['max_latency_s']:.2f}s (of a failed one "
        f"{stats['max_failed_latency_s']:.2f}s); recovered {stats['recovery_s']:.1f}s after "
        f"killing replica pid {pids[0]}"
    )
    print("FAULT " + json.dumps(stats))
    return 1 if math.isnan(stats["recovery_s"]) else 0  # nan: never recovered


def _print_stats(label: str, stats: dict[str, float]) -> None:
    print(
        f"{label}: {stats['requests']} ok, {stats['errors']} errors in {stats['seconds']:.1f}s; "
        f"{stats['requests_per_s']:.2f} req/s, {stats['tokens_per_s']:.1f} tokens/s; latency "
        f"p50 {stats['p50_s']:.3f}s p95 {stats['p95_s']:.3f}s p99 {stats['p99_s']:.3f}s"
    )


def _replicas() -> int:
    from ray import serve

    status = serve.status().applications["psoups"].deployments["SoupModel"]
    return int(status.replica_states.get("RUNNING", 0))


def bench(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from psoups_ray.serve.app import bind_app
    from psoups_ray.serve.engine import SoupCatalog

    if args.scaled_base:
        import tempfile

        from scaled_run import make_scaled_run

        hidden, layers = (int(part) for part in args.scaled_base.lower().split("x"))
        scratch = tempfile.mkdtemp(prefix="psoups-scaled-")
        args.run = make_scaled_run(args.run, f"{scratch}/run", hidden, layers)
    catalog = SoupCatalog(args.run)
    combos = ["+".join(c) for c in catalog.space.full_combinations()][:8]
    max_tokens, requests = (8, 16) if args.smoke_test else (args.max_tokens, args.requests)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    port = args.port
    url = f"http://127.0.0.1:{port}"
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        replica = {"num_cpus": 0.5, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}}}
        ingress = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.1}}
        fixed = {"num_replicas": 1, "max_ongoing_requests": 16, "ray_actor_options": replica}
        app_args = {"run": args.run, "max_batch_size": 8, "max_tokens": max(max_tokens, 16)}

        def deploy(strategy: str, name: str, prefix: str, model_options: dict) -> str:
            app = bind_app(
                {**app_args, "strategy": strategy, "merged_cache_size": 2},
                {"SoupModel": model_options, "Ingress": ingress},
            )
            serve.run(app, name=name, route_prefix=prefix)
            return f"{url}{prefix.rstrip('/')}"

        # One replica each for the like-for-like measurements.
        mixing_url = deploy("mixing", "psoups", "/", fixed)
        asyncio.run(run_load(mixing_url, ["psoups:base"], 1, 2, 60, 4))  # warm-up

        # (2) latency: one request at a time over HTTP vs in process, same tokens.
        http = asyncio.run(run_load(mixing_url, [f"psoups:{combos[0]}"], 1, 5, 300, max_tokens))
        in_process = _in_process_latency(args.run, combos[0], max_tokens, 5)

        # (1) throughput: 8 concurrent requests, 8 combinations vs one combination, and
        # the merged strategy with a cache of 2 merged copies for the same 8 combinations.
        models = [f"psoups:{c}" for c in combos]
        mixed = asyncio.run(run_load(mixing_url, models, 8, requests, 600, max_tokens))
        single = asyncio.run(
            run_load(mixing_url, [f"psoups:{combos[0]}"], 8, requests, 600, max_tokens)
        )
        merged_url = deploy("merged", "psoups-merged", "/merged", fixed)
        merged = asyncio.run(run_load(merged_url, models, 8, requests, 600, max_tokens))
        serve.delete("psoups-merged")

        # (3) autoscaling under sustained load, then idle.
        autoscaling = {
            "max_ongoing_requests": 16,
            "autoscaling_config": {
                "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                "upscale_delay_s": 1, "downscale_delay_s": 5,
                "metrics_interval_s": 0.5, "look_back_period_s": 2,
            },
            "ray_actor_options": replica,
        }  # fmt: skip
        deploy("mixing", "psoups", "/", autoscaling)
        timeline = _autoscaling(url, combos, max_tokens, args.smoke_test)
    finally:
        serve.shutdown()
        ray.shutdown()

    _print_stats("latency, HTTP, 1 at a time", http)
    print(f"latency, in-process SoupEngine.generate: p50 {in_process:.3f}s")
    _print_stats("mixing, 8 combinations, 8 concurrent", mixed)
    _print_stats("mixing, 1 combination, 8 concurrent", single)
    _print_stats("merged (cache 2), 8 combinations, 8 concurrent", merged)
    print("autoscaling timeline (s since load start: SoupModel replicas):")
    print("  " + ", ".join(f"{t:.0f}s:{n}" for t, n in timeline))
    peak = max(n for _, n in timeline)
    print(f"replicas: min 1, peak under load {peak}, at the end {timeline[-1][1]}")
    ratios = {
        "mixing_vs_merged_throughput": mixed["tokens_per_s"] / merged["tokens_per_s"],
        "mixed_vs_single_combination_throughput": mixed["tokens_per_s"] / single["tokens_per_s"],
        "http_vs_in_process_latency": http["p50_s"] / in_process,
        "peak_replicas": peak,
        "final_replicas": timeline[-1][1],
    }
    print("RATIOS " + json.dumps(ratios))
    return 0


def _in_process_latency(run: str, combo: str, max_tokens: int, repeats: int) -> float:
    import torch

    from psoups_ray.prompting import format_prompt
    from psoups_ray.serve.engine import GenerationJob, SamplingParams, SoupEngine

    torch.set_num_threads(1)  # as the replica (OMP_NUM_THREADS=1)
    engine = SoupEngine(run, device="cpu")
    weights = engine.catalog.resolve(f"psoups:{combo}").weights
    times = []
    for index in range(repeats + 1):
        prompt = format_prompt(engine.tokenizer, QUESTIONS[index % len(QUESTIONS)])
        job = GenerationJob(prompt, weights, SamplingParams(max_tokens, seed=index))
        started = time.monotonic()
        engine.generate([job])
        if index:  # the first is a warm-up
            times.append(time.monotonic() - started)
    return statistics.median(times)


def _autoscaling(url: str, combos: list[str], max_tokens: int, smoke: bool):
    """Sustained load from a background thread while sampling the replica count."""
    import threading

    models = [f"psoups:{c}" for c in combos]
    load_seconds = 15 if smoke else 40
    wait_until = time.monotonic() + 90  # start from min_replicas
    while _replicas() > 1 and time.monotonic() < wait_until:
        time.sleep(1)
    thread = threading.Thread(
        target=lambda: asyncio.run(run_load(url, models, 8, 10**6, load_seconds, max_tokens))
    )
    started = time.monotonic()
    thread.start()
    timeline = []
    settle = load_seconds + (30 if smoke else 60)
    while time.monotonic() - started < settle:
        timeline.append((time.monotonic() - started, _replicas()))
        if (
            not thread.is_alive()
            and timeline[-1][1] == 1
            and time.monotonic() - started > (load_seconds + 5)
        ):
            break
        time.sleep(1)
    thread.join()
    return timeline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    load = commands.add_parser("load", help="drive a running endpoint")
    load.add_argument("--url", default="http://127.0.0.1:8000")
    load.add_argument("--model", action="append", help="model ids to cycle (repeatable)")
    load.add_argument("--concurrency", type=int, default=8)
    load.add_argument("--requests", type=int, default=64)
    load.add_argument("--duration", type=float, default=120, help="seconds at most")
    load.add_argument("--max-tokens", type=int, default=32)
    load.add_argument("--api-key")
    run = commands.add_parser("bench", help="start the app for a run and measure it")
    run.add_argument("--run", required=True)
    run.add_argument("--port", type=int, default=8000)
    run.add_argument("--cpus", type=int, default=2)
    run.add_argument("--requests", type=int, default=64)
    run.add_argument("--max-tokens", type=int, default=32)
    run.add_argument("--smoke-test", action="store_true")
    run.add_argument(
        "--scaled-base",
        metavar="HIDDENxLAYERS",
        help="benchmark a random Llama base of this size (e.g. 768x12) with random pole "
        "adapters of the run's rank instead of the run's tiny model (bench/scaled_run.py)",
    )
    kill = commands.add_parser("fault", help="kill a model replica under load, measure recovery")
    kill.add_argument("--url", default="http://127.0.0.1:8000")
    kill.add_argument("--app", default="psoups", help="Serve application whose replica to kill")
    kill.add_argument("--ray-address", help="the Ray cluster (default: the local one)")
    kill.add_argument(
        "--pid", type=int, help="the replica process to kill (default: found through Ray)"
    )
    kill.add_argument("--model", action="append", help="model ids to cycle (repeatable)")
    kill.add_argument("--concurrency", type=int, default=4)
    kill.add_argument("--kill-after", type=float, default=5, help="seconds of load first")
    kill.add_argument("--recovery-timeout", type=float, default=120)
    kill.add_argument("--settle", type=float, default=3, help="seconds of load after recovery")
    kill.add_argument("--max-tokens", type=int, default=8)
    kill.add_argument("--timeout", type=float, default=150, help="client timeout per request")
    kill.add_argument("--api-key")
    args = parser.parse_args()
    if args.command == "bench":
        return bench(args)
    if args.command == "fault":
        return fault(args)
    if args.concurrency < 1 or args.requests < 1 or args.duration <= 0:
        raise SystemExit("--concurrency and --requests must be >= 1, --duration > 0")
    stats = asyncio.run(
        run_load(args.url, args.model or ["psoups:base"], args.concurrency, args.requests,
                 args.duration, args.max_tokens, args.api_key)
    )  # fmt: skip
    _print_stats("load", stats)
    print("STATS " + json.dumps(stats))
    return 0 if stats["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Load and soak benchmark for the embedding, judge, policy and reward servers (loopback only,
bounded in count and time, stops by itself).

For each server: a ramp of closed-loop clients (each sending its next request when the last one
is answered) and then a soak at a steady open-loop rate of half the ramp's best throughput.
Printed per level: throughput, p50/p99 latency, answers by status and dropped requests (no
answer at all); for the soak also the server's RSS at its start and end. The embedding, judge
and policy servers ramp 1 → 64 clients with ``server.max_concurrency=32 server.max_queue=16``;
the reward service (``reward``: a model-free mix, ``reward_embedding``: embedding similarity on
MiniLM) ramps 1 → 512 single-sample clients, as many rollout workers send, with
``max_concurrency=256 max_queue=128``. The top level is beyond the limit on purpose: it may only
see 429/503 besides 200s.

Goals checked at the end: no 5xx other than 503 and nothing dropped at any level; 429/503 only
beyond the limit; RSS growth over the soak under 5 %; soak p99 under 3 × p50.

``embedding_serve`` is the embedding service as one Ray Serve replica (``serve=ray``), to compare
with ``embedding``.

``--replicas`` runs the embedding service as two replicas behind our client (one URL list)
against one, with a replica killed (SIGKILL) and restarted under load: throughput, p99, failed
requests and how soon the restarted replica serves again.

    python benchmarks/load.py [--servers embedding,judge,policy,reward,reward_embedding,embedding_serve]
        [--level-seconds 8] [--soak-seconds 300] [--replicas]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.serving.local_server import LocalServer  # noqa: E402

LIMIT = ["server.max_concurrency=32", "server.max_queue=16", "server.acquire_timeout_s=10"]
LEVELS = (1, 2, 4, 8, 16, 32, 64)
BEYOND_LIMIT = 48  # max_concurrency + max_queue


@dataclass
class Target:
    """A server to load and the request one client sends (``poll``: a queued task's result route),
    its limits and the ramp's levels (clients at once); ``beyond``: the first level past the limit."""

    overrides: list[str]
    route: str
    body: dict
    poll: str | None = None
    limit: tuple[str, ...] = tuple(LIMIT)
    levels: tuple[int, ...] = LEVELS
    beyond: int = BEYOND_LIMIT
    sent: Iterator[int] = field(default_factory=itertools.count)

    def next_body(self) -> dict:
        """The body of the next request: for the reward service a sample never sent before, so
        no cache on the server answers it without model work."""
        if self.route != "/score":
            return self.body
        sample = self.body["samples"][0]
        return {"samples": [{**sample, "completion": f"({next(self.sent)}) {sample['completion']}"}]}


# Many rollout workers, one sample each, against a reward service sized for them.
REWARD_LIMIT = ("server.max_concurrency=256", "server.max_queue=128", "server.acquire_timeout_s=10")
REWARD_LEVELS = (1, 8, 32, 64, 128, 256, 512)
ONE_SAMPLE = {"samples": [{"completion": "<answer>Paris</answer> is the capital.", "ground_truth": "Paris"}]}


TARGETS = {
    "embedding": Target(["service=embedding"], "/embed", {"inputs": ["A short sentence to embed, once more."] * 4}),
    # the same service as one Ray Serve replica behind Ray's proxy (serve=ray)
    "embedding_serve": Target(
        ["service=embedding", "serve=ray", "serve.replicas=1"],
        "/embed",
        {"inputs": ["A short sentence to embed, once more."] * 4},
    ),
    "judge": Target(
        ["service=llm_judge"],
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "Is 2 + 2 = 4? Answer yes or no."}],
            "max_tokens": 8,
            "temperature": 0,
        },
    ),
    "policy": Target(
        ["service=policy", "policy.queue.num_samples=1", "policy.queue.max_output_length=64"],
        "/forward",
        {"question": "What is 2 + 2?"},
        poll="/forward/{task_id}",
    ),
    "reward": Target(
        ["service=reward", "reward=qa_format"], "/score", ONE_SAMPLE, None, REWARD_LIMIT, REWARD_LEVELS, 384
    ),
    "reward_embedding": Target(
        ["service=reward", "reward=embedding"], "/score", ONE_SAMPLE, None, REWARD_LIMIT, REWARD_LEVELS, 384
    ),
}


@dataclass
class Tally:
    """Latencies and outcomes of one level or of the soak."""

    latencies: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    dropped: int = 0
    seconds: float = 0.0

    def row(self, label: str) -> tuple[str, ...]:
        done = len(self.latencies)
        lat = sorted(self.latencies) or [float("nan")]
        p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        codes = " ".join(f"{k}:{v}" for k, v in sorted(self.statuses.items()))
        return label, f"{done / self.seconds:.1f}", f"{1000 * p50:.0f}", f"{1000 * p99:.0f}", codes, str(self.dropped)

    def quantiles(self) -> tuple[float, float]:
        lat = sorted(self.latencies)
        return lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.99 * len(lat)))]


async def one_request(http: aiohttp.ClientSession, target: Target, tally: Tally) -> None:
    """Send one request (and poll a queued task to its result); count what came back."""
    started = time.perf_counter()
    try:
        async with http.post(target.route, json=target.next_body()) as r:
            status, body = r.status, await r.read()
        if target.poll and status == 201:
            path = target.poll.format(**orjson.loads(body))
            while True:
                async with http.get(path) as r:
                    status = r.status
                    await r.read()
                if status != 202:  # 202: still queued or running
                    break
                await asyncio.sleep(0.02)
    except (aiohttp.ClientError, asyncio.TimeoutError):
        tally.dropped += 1
        return
    tally.statuses[status] += 1
    if status == 200:
        tally.latencies.append(time.perf_counter() - started)


def session(url: str, connections: int) -> aiohttp.ClientSession:
    """The load's HTTP client. aiohttp, as OpenRLHF's reward client uses: with hundreds of
    connections httpx's asyncio pool cost this process more CPU than the server it loads
    (256 clients: 106 req/s with httpx, 1,162 with aiohttp, same server)."""
    return aiohttp.ClientSession(
        url, connector=aiohttp.TCPConnector(limit=connections), timeout=aiohttp.ClientTimeout(total=120)
    )


async def closed_loop(url: str, target: Target, clients: int, seconds: float) -> Tally:
    """``clients`` clients, each sending its next request as soon as the last is answered."""
    tally = Tally()
    async with session(url, clients) as http:
        deadline = time.perf_counter() + seconds

        async def client():
            while time.perf_counter() < deadline:
                await one_request(http, target, tally)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        tally.seconds = time.perf_counter() - started
    return tally


async def open_loop(url: str, target: Target, rate: float, seconds: float) -> Tally:
    """Requests started at ``rate`` per second whatever the answers (Poisson arrivals are not
    needed here: a steady rate shows growth in memory and latency more plainly)."""
    tally = Tally()
    async with session(url, 512) as http:
        started, sent, running = time.perf_counter(), 0, set()
        while (now := time.perf_counter() - started) < seconds:
            if sent < now * rate:
                task = asyncio.create_task(one_request(http, target, tally))
                running.add(task)
                task.add_done_callback(running.discard)
                sent += 1
            await asyncio.sleep(min(0.005, 1 / rate))
        await asyncio.gather(*running)
        tally.seconds = time.perf_counter() - started
    return tally


def run(name: str, target: Target, level_seconds: float, soak_seconds: float) -> list[str]:
    """Ramp and soak one server; print its table; return the goals it missed."""
    missed = []
    with tempfile.TemporaryDirectory() as tmp, LocalServer(tmp, *target.overrides, *target.limit) as server:
        process = psutil.Process(server.proc.pid)
        asyncio.run(closed_loop(server.url, target, 4, 3))  # warm-up: first calls compile and allocate
        rows, best = [], 0.0
        for level in target.levels:
            tally = asyncio.run(closed_loop(server.url, target, level, level_seconds))
            rows.append(tally.row(f"{level} clients"))
            best = max(best, len(tally.latencies) / tally.seconds)
            refused = {s for s in tally.statuses if s in (429, 503)}
            bad = {s for s in tally.statuses if s >= 500 and s != 503}
            if bad or tally.dropped:
                missed.append(f"{name}: {level} clients: statuses {sorted(bad)}, dropped {tally.dropped}")
            if refused and level < target.beyond:
                missed.append(f"{name}: {level} clients (within the limit) got {sorted(refused)}")
        time.sleep(10)  # the level beyond the limit leaves a queue (up to acquire_timeout_s): let it drain
        rss_start = process.memory_info().rss
        soak = asyncio.run(open_loop(server.url, target, best / 2, soak_seconds))
        rss_end = process.memory_info().rss
        growth = 100 * (rss_end - rss_start) / rss_start
        rows.append(soak.row(f"soak {soak_seconds:.0f}s at {best / 2:.1f}/s"))
        p50, p99 = soak.quantiles()
        rows.append(
            ("soak RSS", f"{rss_start / 2**20:.0f} MB", f"{rss_end / 2**20:.0f} MB", f"{growth:+.1f} %", "", "")
        )
        if growth >= 5:
            missed.append(f"{name}: RSS grew {growth:.1f} % over the soak")
        if p99 >= 3 * p50:
            missed.append(f"{name}: soak p99 {p99:.3f}s >= 3 x p50 {p50:.3f}s")
        if soak.dropped or any(s >= 500 for s in soak.statuses):
            missed.append(f"{name}: soak statuses {dict(soak.statuses)}, dropped {soak.dropped}")
    print_table(f"{name} server ({' '.join(target.overrides)})", rows)
    return missed


def print_table(title: str, rows: list[tuple[str, ...]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("load", "req/s", "p50 ms", "p99 ms", "answers", "dropped"):
        table.add_column(column, justify="left" if column in ("load", "answers") else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def threaded_clients(client, clients: int, seconds: float, texts: list[str]) -> Tally:
    """``clients`` threads calling ``client.embed(texts)`` back to back (our client's own retries
    and spreading over replicas included); a raised error counts as dropped."""
    tally, deadline = Tally(), time.perf_counter() + seconds

    def one() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                client.embed(texts)
            except Exception:  # noqa: BLE001 - counted as a request the caller lost
                tally.dropped += 1
                continue
            tally.latencies.append(time.perf_counter() - started)
            tally.statuses[200] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tally.seconds = time.perf_counter() - started
    return tally


def replicas(level_seconds: float) -> list[str]:
    """One embedding replica vs two behind one client, then a replica's death and restart under load."""
    from core.models.embedding_client import EmbeddingClient

    texts = ["A short sentence to embed, once more."] * 4
    served = 'embedding_requests_total{route="/embed",status="200"}'
    missed, rows = [], []
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalServer(tmp, "service=embedding") as a,
        LocalServer(tmp, "service=embedding") as b,
    ):
        one, two = EmbeddingClient(a.url), EmbeddingClient([a.url, b.url])
        threaded_clients(two, 4, 3, texts)  # warm-up of both
        for level in (1, 4, 16, 64):
            for label, client in (("1 replica", one), ("2 replicas", two)):
                rows.append(threaded_clients(client, level, level_seconds, texts).row(f"{level} clients, {label}"))
        # 16 clients on two replicas; a is killed after 5 s and started again on its port after 10 s
        result: dict = {}
        runner = threading.Thread(target=lambda: result.update(t=threaded_clients(two, 16, 35, texts)))
        runner.start()
        time.sleep(5)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait()
        time.sleep(5)
        restarted = LocalServer(tmp, "service=embedding", port=a.port).start()
        back = time.monotonic()
        while restarted.metric(served) == 0 and time.monotonic() - back < 20:
            time.sleep(0.1)
        serving_again = time.monotonic() - back
        runner.join()
        restarted.stop()
        tally = result["t"]
        rows.append(tally.row(f"16 clients, 2 replicas, one killed + restarted (serves again {serving_again:.1f}s)"))
        if tally.dropped:
            missed.append(f"replicas: {tally.dropped} requests failed while a replica died and came back")
    print_table("embedding service: replicas behind one client", rows)
    return missed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="embedding,judge,policy")
    parser.add_argument("--level-seconds", type=float, default=8.0)
    parser.add_argument("--soak-seconds", type=float, default=300.0)
    parser.add_argument("--replicas", action="store_true", help="the replica comparison and kill instead")
    args = parser.parse_args()
    missed = []
    if args.replicas:
        missed += replicas(args.level_seconds)
    else:
        for name in args.servers.split(","):
            missed += run(name, TARGETS[name], args.level_seconds, args.soak_seconds)
    print("goals: all met" if not missed else f"goals: {len(missed)} missed")
    for line in missed:
        print("MISSED:", line)
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()

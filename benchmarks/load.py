"""Load and soak benchmark for the embedding, judge and policy servers (loopback only, bounded
in count and time, stops by itself).

For each server: a ramp of closed-loop clients (1 → 64 at once, each sending its next request
when the last one is answered) and then a soak at a steady open-loop rate of half the ramp's
best throughput. Printed per level: throughput, p50/p99 latency, answers by status and dropped
requests (no answer at all); for the soak also the server's RSS at its start and end. The servers
run with ``server.max_concurrency=32 server.max_queue=16``, so the 64-client level is beyond
their limit on purpose: it may only see 429/503 besides 200s.

Goals checked at the end: no 5xx other than 503 and nothing dropped at any level; 429/503 only
beyond the limit; RSS growth over the soak under 5 %; soak p99 under 3 × p50.

    python benchmarks/load.py [--servers embedding,judge,policy] [--level-seconds 8] [--soak-seconds 300]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.serving.local_server import LocalServer  # noqa: E402

LIMIT = ["server.max_concurrency=32", "server.max_queue=16", "server.acquire_timeout_s=10"]
LEVELS = (1, 2, 4, 8, 16, 32, 64)
BEYOND_LIMIT = 48  # max_concurrency + max_queue


@dataclass
class Target:
    """A server to load and the request one client sends (``poll``: a queued task's result route)."""

    overrides: list[str]
    route: str
    body: dict
    poll: str | None = None


TARGETS = {
    "embedding": Target(["service=embedding"], "/embed", {"inputs": ["A short sentence to embed, once more."] * 4}),
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


async def one_request(http: httpx.AsyncClient, target: Target, tally: Tally) -> None:
    """Send one request (and poll a queued task to its result); count what came back."""
    started = time.perf_counter()
    try:
        r = await http.post(target.route, json=target.body)
        if target.poll and r.status_code == 201:
            path = target.poll.format(**r.json())
            while (r := await http.get(path)).status_code == 202:
                await asyncio.sleep(0.02)
    except httpx.TransportError:
        tally.dropped += 1
        return
    tally.statuses[r.status_code] += 1
    if r.status_code == 200:
        tally.latencies.append(time.perf_counter() - started)


async def closed_loop(url: str, target: Target, clients: int, seconds: float) -> Tally:
    """``clients`` clients, each sending its next request as soon as the last is answered."""
    tally = Tally()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
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
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=256)) as http:
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
    with tempfile.TemporaryDirectory() as tmp, LocalServer(tmp, *target.overrides, *LIMIT) as server:
        process = psutil.Process(server.proc.pid)
        asyncio.run(closed_loop(server.url, target, 4, 3))  # warm-up: first calls compile and allocate
        rows, best = [], 0.0
        for level in LEVELS:
            tally = asyncio.run(closed_loop(server.url, target, level, level_seconds))
            rows.append(tally.row(f"{level} clients"))
            best = max(best, len(tally.latencies) / tally.seconds)
            refused = {s for s in tally.statuses if s in (429, 503)}
            bad = {s for s in tally.statuses if s >= 500 and s != 503}
            if bad or tally.dropped:
                missed.append(f"{name}: {level} clients: statuses {sorted(bad)}, dropped {tally.dropped}")
            if refused and level <= BEYOND_LIMIT:
                missed.append(f"{name}: {level} clients (within the limit) got {sorted(refused)}")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="embedding,judge,policy")
    parser.add_argument("--level-seconds", type=float, default=8.0)
    parser.add_argument("--soak-seconds", type=float, default=300.0)
    args = parser.parse_args()
    missed = []
    for name in args.servers.split(","):
        missed += run(name, TARGETS[name], args.level_seconds, args.soak_seconds)
    print("goals: all met" if not missed else f"goals: {len(missed)} missed")
    for line in missed:
        print("MISSED:", line)
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()

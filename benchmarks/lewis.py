"""Lewis-game benchmark, the variants side by side in this one run:

1. the listener service: N games scored by one ``POST /batch_score`` vs the same N games as N
   ``POST /score`` calls one after another (both with ``LISTENER_BATCH_SIZE`` pairs per model call);
2. speaker GRPO step time with the listener embedded (``listener=local``) vs served (``listener=remote``).

    python benchmarks/lewis.py [--games 32] [--batch-size 32] [--steps 6]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from benchmarks.common import best_time, report  # noqa: E402
from benchmarks.training import step_seconds, train  # noqa: E402
from core.serving.local_server import LocalServer  # noqa: E402
from lewis.data import load_games, make_shapes  # noqa: E402
from lewis.rewards import QUESTION  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--games", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32, help="LISTENER_BATCH_SIZE of the service")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_shapes(Path(tmp) / "shapes", games=args.games + args.games // 5 + 2)
        games = load_games(root)[: args.games]
        batch = [
            {"candidate_paths": g["candidates"], "question": QUESTION.format(description=g["description"])}
            for g in games
        ]
        env = {"LISTENER_BATCH_SIZE": str(args.batch_size)}
        with (
            LocalServer(tmp, "service=listener", f"lewis.shapes_root={root}", env=env) as server,
            httpx.Client(base_url=server.url, timeout=300) as http,
        ):
            t_batch = best_time(lambda: http.post("/batch_score", json={"batch": batch}).raise_for_status())
            t_single = best_time(lambda: [http.post("/score", json=item).raise_for_status() for item in batch])
            common = (f"lewis.shapes_root={root}", "train=speaker", "trainer.save_strategy=no")
            train(Path(tmp) / "remote", args.steps, *common, "listener=remote", f"listener.port={server.port}")
        train(Path(tmp) / "local", args.steps, *common, "listener=local")
        per_step = 4  # train=speaker's per_device_train_batch_size
        remote, local = step_seconds(Path(tmp) / "remote", per_step), step_seconds(Path(tmp) / "local", per_step)
    report(
        f"Lewis game: {args.games} games x {len(games[0]['candidates'])} candidates, "
        f"LISTENER_BATCH_SIZE={args.batch_size}",
        [
            (
                "games/s: one /batch_score vs /score one by one",
                f"{args.games / t_batch:.1f}",
                f"{args.games / t_single:.1f}",
                f"{t_single / t_batch:.2f}x",
            ),
            (
                f"speaker step s (median of {args.steps - 1}): listener remote vs local",
                f"{remote:.3f}",
                f"{local:.3f}",
                f"{remote / local:.2f}x",
            ),
        ],
    )


if __name__ == "__main__":
    main()

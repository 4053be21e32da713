"""A bounded loopback load test of the studio: N concurrent gradio_client sessions
on the tiny preset upload a photo, train, generate, export and close, in rounds, for about
``--seconds``; the server runs in this process on 127.0.0.1 only.

    .venv/bin/python bench/load_test.py --sessions 8 --seconds 120 [--markdown bench/RESULTS.md]

Prints (and with ``--markdown`` appends to that file): server RSS after warm-up, at its peak
and after every session closed; rounds and training steps per session (queue fairness: the
min/max ratio of steps per session, 1 = perfectly fair); the largest queue position seen;
errors. The server must stay alive throughout (every call is checked).
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import os
import platform
import re
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("GRADIO_IS_E2E_TEST", "1")  # fast heartbeats: a closed client unloads within a second
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = re.search(r"Model name:\s*(.+)", out)
        cpus = re.search(r"^CPU\(s\):\s*(\d+)", out, re.M)
        return f"{model.group(1).strip() if model else platform.processor()} ({cpus.group(1) if cpus else '?'} CPUs)"
    except OSError:
        return platform.processor() or "unknown"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SessionStats:
    def __init__(self, index: int) -> None:
        self.index = index
        self.rounds = 0
        self.steps = 0
        self.max_queue = 0
        self.errors: list[str] = []
        self.latencies: list[float] = []


def one_session(url: str, photo: str, deadline: float, stats: SessionStats, steps: int) -> None:
    from gradio_client import Client, handle_file

    while time.monotonic() < deadline:
        client = Client(url, verbose=False, analytics_enabled=False)
        try:
            client.predict([handle_file(photo)], api_name="/photos")
            started = time.monotonic()
            # steps, lr, batch, seed, train band, te weight, te target, preview every, live band, balance
            job = client.submit(steps, 3e-3, 1, stats.index, 200, 900, 1e-3, 0.5, 0, 400, 800, 1.0, api_name="/train")
            last = 0
            for status, _plot, _gallery in job:
                match = re.search(r"step (\d+) / (\d+)", status or "")
                if match:
                    last = int(match.group(1))
                queued = re.search(r"(\d+) ahead in line", status or "")
                if queued:
                    stats.max_queue = max(stats.max_queue, int(queued.group(1)))
            stats.steps += last
            client.predict("a photo of {}", "", stats.index, 2, 4.0, "ddim", 1, 400, 800, 1.0, api_name="/generate")
            client.predict(api_name="/export")
            stats.latencies.append(time.monotonic() - started)
            stats.rounds += 1
        except Exception as exc:  # recorded, the load goes on
            stats.errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
        finally:
            client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--steps", type=int, default=10, help="training steps per round")
    parser.add_argument("--photo", default=str(REPO.parent / "shared" / "data" / "faces" / "single" / "f2d_0.jpg"))
    parser.add_argument("--markdown", type=Path, help="append the figures to this file")
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= 16 or not 10 <= args.seconds <= 600:
        parser.error("--sessions must be 1..16 and --seconds 10..600 (this test is bounded)")

    import torch

    torch.set_num_threads(1)
    import app

    demo = app.create_demo("tiny")
    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                **app.launch_kwargs())
    url = demo.local_url
    try:
        start_rss = rss_mb()
        warm = SessionStats(99)
        one_session(url, args.photo, time.monotonic() + 1, warm, args.steps)  # one round: models load, caches fill
        demo.sessions.wait_until(lambda s: not s, timeout=30)
        gc.collect()
        warm_rss = rss_mb()
        peak = {"rss": warm_rss}
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(1.0):
                peak["rss"] = max(peak["rss"], rss_mb())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stats = [SessionStats(i) for i in range(args.sessions)]
        deadline = time.monotonic() + args.seconds
        began = time.monotonic()
        threads = [threading.Thread(target=one_session, args=(url, args.photo, deadline, s, args.steps)) for s in stats]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=args.seconds + 600)
        elapsed = time.monotonic() - began
        closed = demo.sessions.wait_until(lambda s: not s, timeout=60)
        gc.collect()
        time.sleep(2)
        end_rss = rss_mb()
        stop.set()
    finally:
        demo.sessions.close_all()
        demo.close()

    steps = [s.steps for s in stats]
    errors = [e for s in stats for e in s.errors] + warm.errors
    latencies = [t for s in stats for t in s.latencies]
    lines = [
        f"## Load test: {args.sessions} sessions x {args.seconds:.0f} s on tiny, loopback",
        "",
        "```",
        f".venv/bin/python bench/load_test.py --sessions {args.sessions} --seconds {args.seconds:.0f} --steps {args.steps}",
        "```",
        "",
        "| | |",
        "|---|---|",
        f"| date | {dt.date.today().isoformat()} |",
        f"| CPU | `{cpu_model()}`, load average at the end {os.getloadavg()[0]:.1f} |",
        f"| wall time of the load phase | {elapsed:.0f} s |",
        f"| rounds (upload, train {args.steps} steps, generate, export, close) | {sum(s.rounds for s in stats)} "
        f"({', '.join(str(s.rounds) for s in stats)} per session) |",
        f"| training steps per session | {', '.join(map(str, steps))} |",
        f"| queue fairness (min / max steps per session) | {min(steps) / max(max(steps), 1):.2f} |",
        f"| largest queue position seen | {max(s.max_queue for s in stats)} |",
        f"| round latency median / max | {statistics.median(latencies) if latencies else float('nan'):.1f} s / "
        f"{max(latencies) if latencies else float('nan'):.1f} s |",
        f"| server RSS: start / after warm-up / peak / after all sessions closed | {start_rss:.0f} / {warm_rss:.0f} / "
        f"{peak['rss']:.0f} / {end_rss:.0f} MB ({(end_rss - warm_rss) / warm_rss:+.1%} vs warm-up) |",
        f"| sessions left open after the load | {'none' if closed else len(demo.sessions)} |",
        f"| max RSS of the process (ru_maxrss) | {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB |",
        f"| errors | {len(errors)}{': ' + '; '.join(sorted(set(errors))[:5]) if errors else ''} |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with args.markdown.open("a") as handle:
            handle.write("\n" + text)
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())

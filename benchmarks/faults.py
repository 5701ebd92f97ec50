"""The fault table: a live cluster under load while things go wrong, end to end.

    python -m benchmarks.faults [--only worker-kill,worker-stop,scheduler-kill,overload,slowloris,soak]
                                [--soak-minutes 30] [--json benchmarks/results/faults/faults.json]

Each fault gets a fresh cluster (real processes: `up`, or split roles for the scheduler
kill) serving the one-node model behind its uint8 twin, with a fixed batch time per
worker (a device of known speed), and a closed loop of clients (an open loop at 3x
capacity for the overload). Every request sends a picture of one grey level, and its
answer must be that level's channel means: an answer that is not its own request's
is counted ``wrong``. ``lost``: no HTTP answer at all (a hang past 30 s, a dropped
connection). ``twice``: answers the server counted beyond the clients' (Triton's
success count against the 200s received). ``refused``: 503s (the door closing under
overload, or the scheduler gone), apart from any other 5xx. ``recovery_s``: from the
fault's end (a kill, a SIGCONT, a restart, the end of the attack) until successes run
at 90 % of the baseline rate again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

from benchmarks.http_client import Connection
from benchmarks.servers import ROOT, free_port
from scheduler_plugins.builtin_models import build_trivial

MODEL = "trivial"
ENTRY = f"{MODEL}-uint8"
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
TIMEOUT = 30.0  # seconds a client waits before it counts its request lost
# A device of known speed: batches of up to 4 rows, --batch-time each (25 ms: the front
# end is the bottleneck on 2 cores; 100 ms: the workers are, 40 rows/s each).
ENV = {"DASK_BATCH_ROUTER__WORKER__BATCH_TIME": "25ms", "DASK_BATCH_ROUTER__MAX_BATCH_SIZE": "4"}
FAULTS = ("worker-kill", "worker-stop", "scheduler-kill", "overload", "slowloris", "soak")


def body_for(level: int) -> tuple[bytes, dict]:
    pixels = np.full((1, 224, 224, 3), level, np.uint8)
    head = json.dumps({"inputs": [{"name": "pixels", "shape": [1, 224, 224, 3], "datatype": "UINT8",
                                   "parameters": {"binary_data_size": pixels.nbytes}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()  # fmt: skip
    return head + pixels.tobytes(), {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


BODIES = [body_for(level) for level in range(0, 256, 8)]
EXPECTED = [((level / 255) - MEAN) / STD for level in range(0, 256, 8)]


@dataclass
class Record:
    """What the clients saw: one row per request (end time, status, latency, right answer)."""

    t0: float = field(default_factory=time.monotonic)
    rows: list[tuple[float, int, float, bool]] = field(default_factory=list)

    def add(self, start: float, status: int, correct: bool) -> None:
        now = time.monotonic()
        self.rows.append((now - self.t0, status, now - start, correct))

    def between(self, a: float, b: float) -> list[tuple[float, int, float, bool]]:
        return [r for r in self.rows if a <= r[0] < b]

    def rate(self, a: float, b: float) -> float:
        return sum(1 for r in self.between(a, b) if r[1] == 200) / max(1e-9, b - a)

    def recovery(self, since: float, baseline: float, until: float) -> float | None:
        """Seconds after ``since`` until 1-s windows of successes stay at >= 90 % of baseline."""
        t = since
        while t + 1.0 <= until:
            if all(self.rate(u, u + 1.0) >= 0.9 * baseline for u in np.arange(t, min(until - 1.0, t + 3.0) + 1e-9, 1.0)):
                return round(t - since, 1)
            t += 0.5
        return None


async def one(conn: Connection, path: str, i: int, record: Record) -> int:
    body, headers = BODIES[i % len(BODIES)]
    start = time.monotonic()
    try:
        status, rheaders, rbody = await asyncio.wait_for(conn.request("POST", path, headers, body), TIMEOUT)
    except (OSError, asyncio.TimeoutError, ConnectionError):
        conn.close()
        record.add(start, 0, False)  # lost: no answer
        return 0
    correct = False
    if status == 200:
        n = int(rheaders["inference-header-content-length"])
        got = np.frombuffer(rbody[n:], np.float32)
        correct = got.shape == (3,) and bool(np.allclose(got, EXPECTED[i % len(BODIES)], atol=1e-3))
    record.add(start, status, correct)
    return status


async def closed_loop(url: str, clients: int, seconds: float, record: Record, stop: asyncio.Event | None = None) -> None:
    host, port = url.removeprefix("http://").split(":")
    path = f"/v2/models/{ENTRY}/infer"
    end = time.monotonic() + seconds

    async def client(k: int) -> None:
        conn, i = Connection(host, int(port)), k
        while time.monotonic() < end and not (stop and stop.is_set()):
            if await one(conn, path, i, record) in (0, 503):
                await asyncio.sleep(0.05)  # a refused client waits a moment, as Retry-After asks
            i += clients
        conn.close()

    await asyncio.gather(*(client(k) for k in range(clients)))


async def open_loop(url: str, rate: float, seconds: float, record: Record) -> None:
    host, port = url.removeprefix("http://").split(":")
    path, tasks, i = f"/v2/models/{ENTRY}/infer", set(), 0
    start = time.monotonic()
    rng = np.random.default_rng(0)
    t = 0.0
    while t < seconds:
        t += rng.exponential(1 / rate)
        await asyncio.sleep(max(0.0, start + t - time.monotonic()))
        task = asyncio.create_task(one(Connection(host, int(port)), path, i, record))  # a connection each: arrivals never queue client-side
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    await asyncio.gather(*tasks)


def served(url: str) -> int:
    import urllib.request

    with urllib.request.urlopen(f"{url}/v2/models/{ENTRY}/stats", timeout=10) as r:
        return json.loads(r.read())["model_stats"][0]["inference_stats"]["success"]["count"]


def answered_twice(url: str, served_before: int, record: Record) -> int:
    """Requests the server counted as served beyond the 200s the clients received."""
    return served(url) - served_before - sum(1 for r in record.rows if r[1] == 200)


def summary(record: Record, twice: int, recovery: float | None, **extra) -> dict:
    statuses = [r[1] for r in record.rows]
    ok = [r for r in record.rows if r[1] == 200]
    lat = sorted(r[2] for r in ok)
    return {
        "sent": len(statuses), "answered": sum(1 for s in statuses if s), "ok": len(ok),
        "lost": statuses.count(0), "wrong": sum(1 for r in ok if not r[3]), "twice": twice,
        "refused_503": statuses.count(503), "other_5xx": sum(1 for s in statuses if s >= 500 and s != 503),
        "other_4xx": sum(1 for s in statuses if 400 <= s < 500),
        "recovery_s": recovery,
        "p50_ms": round(1e3 * lat[len(lat) // 2], 1) if lat else None,
        "p99_ms": round(1e3 * lat[int(len(lat) * 0.99)], 1) if lat else None,
        **extra,
    }  # fmt: skip


# -- the processes ------------------------------------------------------------------------


class Service:
    """`batch-router up` (or the split roles) with the one-node model, its log in a file."""

    def __init__(self, model: Path, workers: int = 2, split: bool = False) -> None:
        self.model, self.workers, self.split = model, workers, split
        self.port, self.sport = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w", prefix="faults-", suffix=".log", delete=False)
        self.procs: list[subprocess.Popen] = []
        self.scheduler: subprocess.Popen | None = None
        self.worker_procs: list[subprocess.Popen] = []

    def _launch(self, *args: str) -> subprocess.Popen:
        env = {**os.environ, **ENV}
        return subprocess.Popen([sys.executable, "-m", "router_api.cli", *args], cwd=ROOT, env=env, stdout=self.log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def start(self) -> "Service":
        common = ["--model", str(self.model), "--model-name", MODEL]
        if not self.split:
            self.procs.append(self._launch("up", "--workers", str(self.workers), "--threads", "1", "--port", str(self.port), "--grpc-port", "0",
                                           "--scheduler-port", str(self.sport), "--dashboard-port", str(free_port()), *common))  # fmt: skip
        else:
            self.start_scheduler()
            self.procs.append(self._launch("serve", "--scheduler", f"tcp://127.0.0.1:{self.sport}", "--port", str(self.port),
                                             "--grpc-port", "0"))
            self.start_workers()
        self.wait_workers(self.workers)
        return self

    def start_scheduler(self) -> None:
        self.dport = getattr(self, "dport", free_port())
        self.scheduler = self._launch("scheduler", "--port", str(self.sport), "--dashboard-port", str(self.dport),
                                      "--model", str(self.model), "--model-name", MODEL)  # fmt: skip
        self.procs.append(self.scheduler)

    def start_workers(self) -> None:
        for i in range(self.workers):
            w = self._launch("worker", f"tcp://127.0.0.1:{self.sport}", "--name", f"w{i}", "--threads", "1")
            self.worker_procs.append(w)
            self.procs.append(w)

    def wait_workers(self, n: int, timeout: float = 120.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/v1/workers", timeout=5) as r:
                    if len(json.loads(r.read())["workers"]) >= n:
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{n} workers not ready; log {self.log.name}")

    def worker_pids(self) -> list[int]:
        if self.split:
            return [p.pid for p in self.worker_procs if p.poll() is None]
        return [c.pid for c in psutil.Process(self.procs[0].pid).children(recursive=True) if "worker" in c.cmdline()]

    def rss(self) -> dict[str, float]:
        """MiB per process of the service, by role ("up", "worker local-0", ...)."""
        out = {}
        for p in self.procs:
            try:
                root = psutil.Process(p.pid)
                for proc in [root, *root.children(recursive=True)]:
                    cmd = proc.cmdline()
                    role = cmd[3] if len(cmd) > 3 and cmd[2] == "router_api.cli" else proc.name()
                    if "--name" in cmd:
                        role += " " + cmd[cmd.index("--name") + 1]
                    out[role] = round(proc.memory_info().rss / 2**20, 1)
            except psutil.NoSuchProcess:
                pass
        return out

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


# -- the faults --------------------------------------------------------------------------


async def with_fault(svc: Service, clients: int, before: float, after: float, fault, **extra) -> tuple[Record, dict, float]:
    """Load throughout; ``fault(t0)`` runs after ``before`` seconds and returns when the
    fault ends (seconds after ``t0``: recovery is measured from then). Returns the record,
    its summary (``extra`` added) and that moment."""
    record = Record()
    count0 = served(svc.url)  # the front end's statistics: they outlive a scheduler
    load = asyncio.create_task(closed_loop(svc.url, clients, 1e9, record, stop := asyncio.Event()))
    await asyncio.sleep(before)
    baseline = record.rate(1.0, before)
    end = await fault(record.t0)
    await asyncio.sleep(after)
    stop.set()
    await load
    twice = answered_twice(svc.url, count0, record)
    recovery = record.recovery(end, baseline, record.rows[-1][0])
    return record, summary(record, twice, recovery, baseline_per_s=round(baseline, 1), **extra), end


async def worker_kill(model: Path, clients: int) -> dict:
    svc = Service(model).start()
    try:
        async def fault(t0: float) -> float:
            os.kill(svc.worker_pids()[0], signal.SIGKILL)
            return time.monotonic() - t0

        return (await with_fault(svc, clients, 6.0, 20.0, fault))[1]
    finally:
        svc.stop()


async def worker_stop(model: Path, clients: int) -> dict:
    svc = Service(model).start()
    try:
        async def fault(t0: float) -> float:
            pid = svc.worker_pids()[0]
            os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(15.0)
            os.kill(pid, signal.SIGCONT)
            return time.monotonic() - t0

        record, out, end = await with_fault(svc, clients, 6.0, 15.0, fault)
        return out | {"while_stopped_per_s": round(record.rate(end - 12.0, end - 1.0), 1)}
    finally:
        svc.stop()


async def scheduler_kill(model: Path, clients: int) -> dict:
    svc = Service(model, split=True).start()
    try:
        async def fault(t0: float) -> float:
            svc.scheduler.send_signal(signal.SIGKILL)
            await asyncio.sleep(3.0)
            svc.start_scheduler()  # on the same port; the workers died with the old one
            back = time.monotonic() - t0
            await asyncio.sleep(0.5)
            svc.start_workers()
            return back

        record, out, end = await with_fault(svc, clients, 6.0, 25.0, fault)
        gap = [r[0] for r in record.rows if r[1] == 200 and r[0] > end]
        return out | {"first_success_after_restart_s": round(gap[0] - end, 1) if gap else None}
    finally:
        svc.stop()


async def overload(model: Path, clients: int, seconds: float = 30.0) -> dict:
    svc = Service(model).start()
    try:
        warm = Record()  # capacity: enough clients to keep every batch full
        await closed_loop(svc.url, 4 * clients, 8.0, warm)
        capacity = warm.rate(2.0, 8.0)
        record = Record()
        count0 = served(svc.url)
        await open_loop(svc.url, 3 * capacity, seconds, record)
        twice = answered_twice(svc.url, count0, record)
        wait = 5.0  # batch-router.max-queue-wait's default
        out = summary(record, twice, None, capacity_per_s=round(capacity, 1), offered_per_s=round(3 * capacity, 1),
                      max_queue_wait_s=wait)  # fmt: skip
        batch = float(ENV["DASK_BATCH_ROUTER__WORKER__BATCH_TIME"].removesuffix("ms")) / 1e3
        out["p99_target_ms"] = round(1e3 * (wait + batch), 1)  # max-queue-wait + one batch
        return out
    finally:
        svc.stop()


async def slowloris(model: Path, clients: int, connections: int = 200, seconds: float = 30.0) -> dict:
    svc = Service(model).start()
    socks: list = []
    try:
        async def fault(t0: float) -> float:
            for _ in range(connections):  # headers begun, never finished: a byte now and then
                _, w = await asyncio.open_connection("127.0.0.1", svc.port)
                w.write(b"POST /v2/models/trivial-uint8/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                socks.append(w)
            for _ in range(int(seconds / 5)):
                await asyncio.sleep(5.0)
                for w in socks:
                    if not w.is_closing():
                        w.write(b"X-a: b\r\n")
            for w in socks:
                w.close()
            return time.monotonic() - t0

        record, out, end = await with_fault(svc, clients, 6.0, 8.0, fault, connections=connections)
        lat = sorted(r[2] for r in record.between(6.0, end) if r[1] == 200)
        return out | {"during_attack_per_s": round(record.rate(6.0, end), 1),
                      "during_attack_p50_ms": round(1e3 * lat[len(lat) // 2], 1) if lat else None}  # fmt: skip
    finally:
        svc.stop()


async def soak(model: Path, clients: int, minutes: float) -> dict:
    svc = Service(model).start()
    record = Record()
    samples: list[tuple[float, dict]] = []
    try:
        count0 = served(svc.url)
        load = asyncio.create_task(closed_loop(svc.url, clients, 60 * minutes, record))
        while not load.done():
            samples.append((round(time.monotonic() - record.t0, 1), svc.rss()))
            print(f"  soak {samples[-1][0]:.0f} s: " + ", ".join(f"{k} {v:.1f}" for k, v in samples[-1][1].items()), flush=True)
            await asyncio.wait([load], timeout=30.0)
        twice = answered_twice(svc.url, count0, record)
        warm = next((s for t, s in samples if t >= min(120.0, 60 * minutes / 3)), samples[0][1])
        last = samples[-1][1]
        growth = {k: round(last[k] - warm[k], 1) for k in last if k in warm}
        return summary(record, twice, None, minutes=minutes, rss_after_warmup_mib={k: round(v, 1) for k, v in warm.items()},
                       rss_growth_mib=growth, rss_samples=samples)  # fmt: skip
    finally:
        svc.stop()


def table(results: dict) -> str:
    cols = ("sent", "ok", "lost", "wrong", "twice", "refused_503", "other_5xx", "recovery_s", "p50_ms", "p99_ms")
    lines = ["| fault | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(str(r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict:
    model = build_trivial(Path(tempfile.mkdtemp(prefix="faults-")) / "trivial.onnx")
    runs = {
        "worker-kill": lambda: worker_kill(model, args.clients),
        "worker-stop": lambda: worker_stop(model, args.clients),
        "scheduler-kill": lambda: scheduler_kill(model, args.clients),
        "overload": lambda: overload(model, args.clients),
        "slowloris": lambda: slowloris(model, args.clients),
        "soak": lambda: soak(model, args.clients, args.soak_minutes),
    }
    results = {}
    for name in args.only:
        print(f"== {name}", flush=True)
        results[name] = await runs[name]()
        print(json.dumps({k: v for k, v in results[name].items() if k != "rss_samples"}), flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", type=lambda s: s.split(","), default=list(FAULTS), help="comma-separated: " + ",".join(FAULTS))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--soak-minutes", type=float, default=30.0)
    p.add_argument("--batch-time", default="25ms", help="each worker batch takes at least this long (a device of known speed)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    ENV["DASK_BATCH_ROUTER__WORKER__BATCH_TIME"] = args.batch_time
    if unknown := set(args.only) - set(FAULTS):
        p.error(f"unknown fault(s) {sorted(unknown)}")
    results = asyncio.run(main_async(args))
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        args.json.write_text(json.dumps({"machine": f"{os.cpu_count()} cores", "commit": commit, "batch_time": args.batch_time,
                                         "clients": args.clients, "results": results}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()

"""What the load generator's own HTTP client costs in CPU: ours (benchmarks/httpload.py)
against aiohttp and httpx, side by side.

Why: the load generator shares the 2 cores with the server it measures, so each CPU-second
its client spends is stolen from the server; httpload.py's hand-written client is worth
keeping only if a stock one costs materially more. One bare Tornado server (bare_server.py)
runs in its own process; each client, in a fresh subprocess, runs a closed loop of C
keep-alive connections sending N POSTs, and that subprocess's user+sys CPU over the loop
(after a warm-up) is measured. Rounds alternate the clients, as this VM's speed drifts.

    .venv/bin/python -m benchmarks.probes.http_client_cost [--requests 2000]
        [--concurrency 16] [--rounds 5] [--json benchmarks/results/http_client_cost.json]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional
from urllib.parse import urlsplit

from benchmarks.servers import ROOT, spawn_bare, stop

CLIENTS = ("ours", "aiohttp", "httpx")
INFER = "/v2/models/resnet50/infer"
SMALL = json.dumps({"inputs": [{"name": "input", "shape": [1, 16], "datatype": "FP32", "data": [
    0.125 * i for i in range(16)]}], "outputs": [{"name": "logits"}]}).encode()
CASES: dict[str, tuple[dict[str, str], bytes]] = {  # 602112 B = float32 1x3x224x224; JSON
    "tensor_602112B": ({"Content-Type": "application/octet-stream"}, bytes(range(256)) * 2352),
    f"json_{len(SMALL)}B": ({"Content-Type": "application/json"}, SMALL),
}
Send = Callable[[int], Awaitable[tuple[int, int]]]  # worker index -> (status, body bytes)


def _server_cpu_s(pid: int) -> float:
    """utime+stime of another process from /proc (10 ms ticks): the server's side."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _sockets() -> set[str]:
    """This process's open sockets (their inodes): unchanged over the loop = keep-alive."""
    fds = (os.path.join("/proc/self/fd", f) for f in os.listdir("/proc/self/fd"))
    return {t for t in (os.readlink(f) for f in fds if os.path.islink(f)) if t.startswith("socket:")}


async def _closed_loop(send: Send, c: int, n: int) -> Counter:
    """c workers, one keep-alive connection each, sending n requests in all."""
    left, errors = n, Counter()

    async def worker(i: int) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            try:
                status, size = await send(i)
                if status != 200 or size == 0:
                    errors[f"status {status}, {size} B"] += 1
            except Exception as e:  # noqa: BLE001 - the class name is the error kind
                errors[type(e).__name__] += 1
                await asyncio.sleep(0.01)

    await asyncio.gather(*(worker(i) for i in range(c)))
    return errors


async def child(client: str, case: str, url: str, n: int, c: int, server_pid: int) -> dict:
    """Runs in the fresh subprocess: set the client up, warm it up, measure N requests."""
    headers, body = CASES[case]
    u, full = urlsplit(url), url + INFER
    send: Send
    if client == "ours":
        from benchmarks.http_client import Connection
        conns = [Connection(u.hostname or "127.0.0.1", u.port or 80) for _ in range(c)]

        async def send(i: int) -> tuple[int, int]:
            status, _, out = await conns[i].request("POST", INFER, headers, body)
            return status, len(out)
        closing: Callable[[], Any] = lambda: [k.close() for k in conns]
    elif client == "aiohttp":
        import aiohttp
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(
            limit=c, keepalive_timeout=60), timeout=aiohttp.ClientTimeout(total=120))

        async def send(i: int) -> tuple[int, int]:
            async with session.post(full, data=body, headers=headers) as r:
                return r.status, len(await r.read())
        closing = session.close
    else:
        import httpx
        hc = httpx.AsyncClient(http1=True, http2=False, timeout=120, limits=httpx.Limits(
            max_connections=c, max_keepalive_connections=c, keepalive_expiry=60))

        async def send(i: int) -> tuple[int, int]:
            r = await hc.post(full, content=body, headers=headers)
            return r.status_code, len(r.content)
        closing = hc.aclose
    warm = await _closed_loop(send, c, max(4 * c, n // 10))  # connections open, code hot
    socks0, s0 = _sockets(), _server_cpu_s(server_pid)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    errors = await _closed_loop(send, c, n)
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    s1, socks1 = _server_cpu_s(server_pid), _sockets()
    if asyncio.iscoroutine(done := closing()):
        await done
    user, sys_ = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
    return {"client": client, "case": case, "requests": n, "concurrency": c,
            "cpu_us_per_req": 1e6 * (user + sys_) / n, "user_s": user, "sys_s": sys_,
            "wall_s": t1 - t0, "req_per_s": n / (t1 - t0), "server_cpu_us_per_req": 1e6 * (s1 - s0) / n,
            "errors": dict(errors), "warmup_errors": dict(warm), "sockets": len(socks1),
            "same_sockets": socks0 == socks1}  # True: keep-alive, no reconnect while measured


def summarize(rows: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for case, by_client in rows.items():
        ours = [r.get("cpu_us_per_req") for r in by_client.get("ours", [])]
        out[case] = {}
        for client, rs in by_client.items():
            good = [r for r in rs if "error" not in r]
            if not good:
                out[case][client] = {"error": rs[0].get("error") if rs else "no rounds"}
                continue
            cpu = [r["cpu_us_per_req"] for r in good]
            s = {"cpu_us_per_req_median": statistics.median(cpu), "min": min(cpu), "max": max(cpu),
                 "req_per_s_median": statistics.median(r["req_per_s"] for r in good),
                 "server_cpu_us_per_req_median": statistics.median(r["server_cpu_us_per_req"] for r in good),
                 "rounds_ok": len(good), "errors": sum(sum(r["errors"].values()) for r in good)}
            pairs = [r["cpu_us_per_req"] / o for r, o in zip(rs, ours) if o and "error" not in r]
            if pairs and client != "ours":  # same-round pairs cancel the VM's drift
                s["ratio_to_ours"] = s["cpu_us_per_req_median"] / statistics.median(o for o in ours if o)
                s["paired_ratio_median"] = statistics.median(pairs)
            out[case][client] = s
    return out


def _measure(a: argparse.Namespace, clients: list[str]) -> dict[str, dict[str, list[dict]]]:
    """The server once; then per round, per case, each client in a fresh subprocess."""
    rows: dict[str, dict[str, list[dict]]] = {case: {k: [] for k in clients} for case in CASES}
    proc, url, _ = spawn_bare(None)
    try:
        for rnd, case, k in ((r, c, k) for r in range(a.rounds) for c in CASES for k in clients):
            n = a.json_requests if a.json_requests and case.startswith("json") else a.requests
            res = subprocess.run([sys.executable, "-m", "benchmarks.probes.http_client_cost", "--child", k,
                                  "--case", case, "--url", url, "--server-pid", str(proc.pid),
                                  "--requests", str(n), "--concurrency", str(a.concurrency)],
                                 cwd=ROOT, capture_output=True, text=True)
            try:
                row = json.loads(res.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                row = {"client": k, "case": case, "error": f"exit {res.returncode}: {res.stderr.strip()[-500:]}"}
            rows[case][k].append(row)
            print(f"round {rnd + 1}/{a.rounds} {case:>15} {k:>8}: " + (
                f"{row['cpu_us_per_req']:7.1f} us CPU/req {row['req_per_s']:7.1f} req/s  server "
                f"{row['server_cpu_us_per_req']:6.1f} us/req  errors {row['errors'] or 0}"
                if "error" not in row else f"FAILED {row['error']}"), flush=True)
    finally:
        stop(proc)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="measured requests per client and case")
    p.add_argument("--json-requests", type=int, help="for the small JSON case (default: --requests)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    for hidden in ("--child", "--case", "--url", "--server-pid"):  # the measured subprocess
        p.add_argument(hidden, help=argparse.SUPPRESS, type=int if hidden == "--server-pid" else str)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(asyncio.run(child(a.child, a.case, a.url, a.requests, a.concurrency, a.server_pid))))
        return 0
    # sniffio: without it httpcore 1.0.9 retries a failed `import sniffio` on every request
    versions = {k: next((d.version for d in importlib.metadata.distributions(name=k)), None)
                for k in ("aiohttp", "httpx", "httpcore", "h11", "anyio", "sniffio", "tornado")}
    missing = [k for k in ("aiohttp", "httpx") if versions[k] is None]
    for k in missing:
        print(f"\n!!! {k} IS NOT INSTALLED: it is NOT measured (pip install {k}) !!!\n", flush=True)
    load_before, t_start = os.getloadavg(), time.monotonic()
    rows = _measure(a, [k for k in CLIENTS if k not in missing])
    summary = summarize(rows)
    for k in missing:  # in the table and the JSON too, never a silent gap
        for by_client in summary.values():
            by_client[k] = {"error": f"{k} NOT INSTALLED, not measured"}
    print(f"\nclient CPU per request, median over {a.rounds} rounds (min-max); C={a.concurrency}\n"
          f"{'case':>15} {'client':>8} {'CPU us/req':>11} {'range':>11} {'req/s':>8} "
          f"{'server us/req':>13} {'x ours':>7} {'paired':>7}")
    for case, by_client in summary.items():
        for k, s in by_client.items():
            if "error" in s:
                print(f"{case:>15} {k:>8} FAILED: {s['error']}")
                continue
            print(f"{case:>15} {k:>8} {s['cpu_us_per_req_median']:11.1f} {s['min']:5.0f}-{s['max']:<5.0f} "
                  f"{s['req_per_s_median']:8.1f} {s['server_cpu_us_per_req_median']:13.1f} "
                  f"{s.get('ratio_to_ours', 1.0):7.2f} {s.get('paired_ratio_median', 1.0):7.2f}")
    for k in missing:
        print(f"!!! {k} NOT INSTALLED: NOT MEASURED !!!")
    if a.json:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        a.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
                "versions": versions, "missing": missing, "commit": git.stdout.strip(),
                "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                "total_s": round(time.monotonic() - t_start, 1), "server": "benchmarks.bare_server",
                "body_bytes": {c: len(b) for c, (_, b) in CASES.items()}, "args": {**vars(a), "json": str(a.json)}}
        a.json.write_text(json.dumps({"meta": meta, "summary": summary, "rounds": rows}, indent=1) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

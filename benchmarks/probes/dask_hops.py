"""Where a Dask round trip's time goes, hop by hop, in batch-router's design.

In-process scheduler (inproc:// client + tcp worker), BatchedSend intervals 0, reply by
``log_event``: the public-API floor under the router's latency. A plugin stamps the
``update_graph`` hook and the reply event; the task stamps its own start.

``--idle-ms 0,20``: the task first sleeps that long (its sleep is not counted), as every
process but the model's sits idle while a batch computes. On a VM the same hops then
cost more: idle vCPUs are descheduled, and wake up slow and cold.

    .venv/bin/python -m benchmarks.probes.dask_hops [--idle-ms 0,20]
"""
import argparse
import asyncio
import os
import subprocess
import sys
import time

import dask
import numpy as np
from distributed import Client, Scheduler
from distributed.diagnostics.plugin import SchedulerPlugin

from benchmarks.probes.echo_task import echo

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

class P(SchedulerPlugin):
    name = "p"
    def __init__(self): self.ug = {}; self.le = {}
    def update_graph(self, scheduler, *, keys, **kw):
        for k in keys: self.ug[k] = time.time()
    def log_event(self, topic, msg):
        if topic == "t": self.le[msg["id"]] = time.time()

async def main(payload_kb, idle_ms=0.0):
    p = P()
    with dask.config.set({"distributed.scheduler.work-stealing": False, "distributed.admin.low-level-log-length": 32}):
        async with Scheduler(host=[None, "127.0.0.1"], protocol=["inproc", "tcp"], port=[None, 0], dashboard=False, plugins=[p]) as s:
            tcp = s.listeners[1].contact_address
            env = dict(os.environ, PYTHONPATH=ROOT)
            proc = subprocess.Popen([sys.executable, "-c", f"""
import asyncio
from distributed import Worker
async def m():
    async with Worker('{tcp}', nthreads=1) as w:
        w.batched_stream.interval = 0
        await w.finished()
asyncio.run(m())
"""], env=env, stderr=subprocess.DEVNULL)
            while not s.workers: await asyncio.sleep(0.1)
            addr = next(iter(s.workers))
            s.stream_comms[addr].interval = 0
            async with Client(s.listeners[0].contact_address, asynchronous=True) as c:
                c.scheduler_comm.interval = 0
                s.client_comms[c.id].interval = 0
                done = {}
                def handler(ev):
                    done[ev[1]["id"]].set_result((time.time(), ev[1]["t"], ev[1]["idle"]))
                c.subscribe_topic("t", handler)
                await asyncio.sleep(0.2)
                data = np.zeros(payload_kb * 1024, np.uint8)
                rows = []
                for i in range(200):
                    f = asyncio.get_running_loop().create_future(); done[str(i)] = f
                    t0 = time.time()
                    fut = c.submit(echo, {"id": str(i), "topic": "t", "x": data, "idle": idle_ms / 1e3}, key=f"k-{i}", workers=[addr], pure=False)
                    t_client_done, t_task, idle = await f
                    fut.release()
                    t_reply = t_task + idle  # hops only: the task's own sleep is not the path's
                    rows.append((p.ug[f"k-{i}"] - t0, t_task - p.ug[f"k-{i}"], p.le[str(i)] - t_reply, t_client_done - p.le[str(i)], t_client_done - t0 - idle))
                a = np.median(np.array(rows[20:]), axis=0) * 1e3
                print(f"{payload_kb} KB, idle {idle_ms:g} ms: submit->update_graph hook {a[0]:.2f}, hook->task start {a[1]:.2f}, task->scheduler {a[2]:.2f}, scheduler->client {a[3]:.2f}, total {a[4]:.2f} ms")
            proc.terminate(); proc.wait()

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Dask's hop costs on the router's path")
    ap.add_argument("--idle-ms", default="0", help="comma-separated: how long the task idles before replying")
    a = ap.parse_args()
    for idle in (float(x) for x in a.idle_ms.split(",")):
        for kb in (4, 600):
            asyncio.run(main(kb, idle))

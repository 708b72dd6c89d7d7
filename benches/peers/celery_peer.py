"""The Celery baseline of `cargo bench --bench distributed`.

Runs the same workload as the platform bench with Celery 5 on the same
RabbitMQ: JOBS no-op tasks published by CLIENTS threads with publisher
confirms to a quorum queue, consumed by WORKERS worker processes with a
thread pool of CONCURRENCY, acks_late (a task is acknowledged after it
ran, as Atelier's workers do), prefetch 16 × CONCURRENCY (see below;
ATELIER_BENCH_CELERY_PREFETCH sets the multiplier). Each task records its enqueue, start and
end times in Redis (the cheapest result a peer can keep; Atelier records
its outputs, credits and events in PostgreSQL). Prints one JSON line:

  {"jobs", "seconds", "jobs_per_s", "publish_per_s",
   "start_p50_ms", "start_p99_ms", "done_p50_ms", "done_p99_ms"}

Driven by scripts/bench-celery, which owns the venv; not imported by
anything else. The queue and the Redis key are unique per run and deleted
at the end.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid

from celery import Celery
from kombu import Queue

BROKER = os.environ.get("ATELIER_BENCH_CELERY_BROKER", "amqp://guest:guest@127.0.0.1:5672//")
REDIS = os.environ.get("ATELIER_BENCH_CELERY_REDIS", "redis://127.0.0.1:6379/15")
# Unique per run; the worker processes inherit it.
RUN = os.environ.setdefault("ATELIER_BENCH_CELERY_RUN", f"celerybench-{uuid.uuid4().hex[:12]}")

app = Celery("celery_peer", broker=BROKER)
app.conf.update(
    task_queues=[Queue(RUN, queue_arguments={"x-queue-type": "quorum"}, durable=True)],
    task_default_queue=RUN,
    task_acks_late=True,
    task_ignore_result=True,
    broker_transport_options={"confirm_publish": True},
    worker_detect_quorum_queues=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    # Celery's default (4 × concurrency) left the workers idle here: 50
    # tasks/s with p50 waits of 20-40 s and 0.2 cores busy (1 × gave 12.6/s;
    # 16 × gave 1,017/s; 64 × 1,074/s on the same run). The peer gets the
    # setting that serves it best, so the ratio is not flattered.
    worker_prefetch_multiplier=int(os.environ.get("ATELIER_BENCH_CELERY_PREFETCH", "16")),
)

_redis = None


def redis_client():
    global _redis
    if _redis is None:
        import redis

        _redis = redis.Redis.from_url(REDIS)
    return _redis


@app.task(name="noop")
def noop(enqueued_ms):
    started = time.time() * 1000.0
    redis_client().rpush(RUN, f"{enqueued_ms},{started},{time.time() * 1000.0}")


def percentile(sorted_values, p):
    i = round((len(sorted_values) - 1) * p)
    return sorted_values[min(i, len(sorted_values) - 1)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=400)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()

    r = redis_client()
    r.delete(RUN)
    # Root in CI: Celery warns about it on every start.
    env = dict(os.environ, PYTHONWARNINGS="ignore::UserWarning")
    here = os.path.dirname(os.path.abspath(__file__))
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_peer", "worker",
             "--pool", "threads", "--concurrency", str(args.concurrency),
             "--queues", RUN, "--hostname", f"w{i}-{RUN}@%h",
             "--without-gossip", "--without-mingle", "--without-heartbeat",
             "--loglevel", "ERROR"],
            cwd=here, env=env, stdout=subprocess.DEVNULL,
        )
        for i in range(args.workers)
    ]
    try:
        # Every worker consuming, and one task through each connection
        # before the clock starts.
        deadline = time.time() + 60
        while len(app.control.ping(timeout=0.5)) < args.workers:
            if time.time() > deadline:
                raise SystemExit("celery workers did not start within 60 s")
        for _ in range(args.workers * 2):
            noop.delay(time.time() * 1000.0)
        while r.llen(RUN) < args.workers * 2:
            if time.time() > deadline:
                raise SystemExit("celery workers did not run a task within 60 s")
            time.sleep(0.05)
        r.delete(RUN)

        next_job = iter(range(args.jobs))
        lock = threading.Lock()

        def client():
            while True:
                with lock:
                    if next(next_job, None) is None:
                        return
                noop.delay(time.time() * 1000.0)

        began = time.time()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        published = time.time() - began
        deadline = time.time() + 600
        while r.llen(RUN) < args.jobs:
            if time.time() > deadline:
                raise SystemExit(f"only {r.llen(RUN)} of {args.jobs} celery tasks ran in 600 s")
            time.sleep(0.02)
        rows = [tuple(map(float, x.decode().split(","))) for x in r.lrange(RUN, 0, -1)]
        first = min(e for e, _, _ in rows)
        last = max(d for _, _, d in rows)
        start = sorted(s - e for e, s, _ in rows)
        done = sorted(d - e for e, _, d in rows)
        print(json.dumps({
            "jobs": len(rows),
            "seconds": round((last - first) / 1000.0, 3),
            "jobs_per_s": round(len(rows) / ((last - first) / 1000.0), 1),
            "publish_per_s": round(args.jobs / published, 1),
            "start_p50_ms": round(percentile(start, 0.5), 1),
            "start_p99_ms": round(percentile(start, 0.99), 1),
            "done_p50_ms": round(percentile(done, 0.5), 1),
            "done_p99_ms": round(percentile(done, 0.99), 1),
        }), flush=True)
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()
        r.delete(RUN)
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(RUN)


if __name__ == "__main__":
    main()

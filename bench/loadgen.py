"""Load generators of the benchmarks: client processes running a Python ``target`` for
about ``seconds`` (``run_clients``), or ``wrk`` (Debian package wrk), a C load generator
whose own CPU use on a 2-core machine is a fraction of Python clients' (``wrk``); and
``wait_up``, which waits for a server the benchmark started."""
import http.client
import multiprocessing
import re
import subprocess
import sys
import time

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_clients(target, args, clients, seconds):
    """Run the client processes to their end; return their results, one per process."""
    queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=target, args=(*args, queue)) for _ in range(clients)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=seconds + 60) for _ in procs]
    for proc in procs:
        proc.join()
    return results


def wrk(url, token, seconds, connections):
    """Run wrk once (one thread, ``connections`` keep-alive connections, the bearer
    ``token`` if any); return (requests/s, p50 ms, p99 ms). Exits on any non-2xx answer."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if token:
        argv[1:1] = ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        sys.exit(f"wrk saw non-2xx answers from {url}:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50, p99 = (float(v) * UNITS[u] for v, u in
                (re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b", out).groups() for p in (50, 99)))
    return rps, p50, p99


def wait_up(port, path, headers=None, timeout=60):
    """Return once ``GET path`` on 127.0.0.1:``port`` answers 200; RuntimeError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path, headers=headers or {})
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the server on port {port} did not start")

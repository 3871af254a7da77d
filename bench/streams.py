"""Serving benchmark: short-request throughput with and without many open task-report
streams, for a choice of gunicorn worker classes (the choice is in gunicorn.conf.py).

For each configuration: gunicorn on loopback (2 workers), then
  1. requests/s of ``GET /api/tasks`` (token look-up + count + page of 20) from C keep-alive
     client processes, with no stream open;
  2. the same while S ``GET /api/tasks/report`` streams are open (each one checked to have
     received its first bytes, and checked again to be alive at the end);
  3. latency p50/p95 of single requests during 2.

Usage (from the project root)::

    .venv/bin/python bench/streams.py                       # gunicorn.conf.py as is, and sync
    .venv/bin/python bench/streams.py --streams 50 --seconds 5 --clients 4
"""
import argparse
import http.client
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from loadgen import run_clients

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare(data_dir):
    """A database with the initial data and a permanent token for circus."""
    env = {**os.environ, "CIRCUS_DATA_DIR": data_dir}
    flask = [sys.executable, "-m", "flask", "--app", "app"]
    subprocess.run(flask + ["init-db"], cwd=ROOT, env=env, check=True, capture_output=True)
    out = subprocess.run(flask + ["add-permanent-token", "circus"], cwd=ROOT, env=env,
                         check=True, capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def start_server(data_dir, port, extra):
    env = {**os.environ, "CIRCUS_DATA_DIR": data_dir}
    cmd = [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "-w", "2", *extra,
           "app:create_app()"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/api/status")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def client(port, token, seconds, queue):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {token}"}
    count, latencies = 0, []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        conn.request("GET", "/api/tasks?limit=20", headers=headers)
        res = conn.getresponse()
        res.read()
        if res.status != 200:
            raise RuntimeError(res.status)
        latencies.append(time.perf_counter() - start)
        count += 1
    queue.put((count, latencies))


def load(port, token, seconds, clients):
    results = run_clients(client, (port, token, seconds), clients, seconds)
    total = sum(c for c, _ in results)
    latencies = sorted(lat for _, lats in results for lat in lats)
    return (total / seconds, latencies[len(latencies) // 2] * 1000,
            latencies[int(len(latencies) * 0.95)] * 1000)


def open_streams(port, token, count):
    streams = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall((f"GET /api/tasks/report HTTP/1.1\r\nHost: x\r\n"
                      f"Authorization: Bearer {token}\r\n\r\n").encode())
        streams.append(sock)
    for sock in streams:  # each one got its headers and first byte
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                raise RuntimeError("stream closed")
            data += chunk
        if b" 200 " not in data.split(b"\r\n", 1)[0]:
            raise RuntimeError(data[:100])
    return streams


def alive(streams):
    """Streams still open (no EOF) at the end."""
    count = 0
    for sock in streams:
        sock.setblocking(False)
        try:
            count += sock.recv(65536) != b""
        except BlockingIOError:
            count += 1
        except OSError:
            pass
    return count


def measure(label, extra, args, data_dir, token):
    port = free_port()
    server = start_server(data_dir, port, extra)
    try:
        load(port, token, 1, args.clients)  # warm-up
        idle = load(port, token, args.seconds, args.clients)
        t0 = time.monotonic()
        try:
            streams = open_streams(port, token, args.streams)
            opened = f"{len(streams)} opened in {time.monotonic() - t0:.1f} s"
        except (OSError, RuntimeError) as exc:
            streams, opened = [], f"could not open {args.streams}: {exc}"
        busy = load(port, token, args.seconds, args.clients) if streams else None
        still = alive(streams)
        for sock in streams:
            sock.close()
        print(f"{label:38s} no streams: {idle[0]:7.0f} req/s p50 {idle[1]:5.1f} ms "
              f"p95 {idle[2]:5.1f} ms | {opened}", flush=True)
        if busy:
            print(f"{'':38s} {args.streams} streams: {busy[0]:7.0f} req/s p50 {busy[1]:5.1f} ms "
                  f"p95 {busy[2]:5.1f} ms | ratio {busy[0] / idle[0]:.2f} | alive {still}",
                  flush=True)
    finally:
        server.terminate()
        server.wait(30)


CONFIGS = {
    "gunicorn.conf.py": [],
    "sync": ["-k", "sync", "--threads", "1"],
    "gthread-16": ["-k", "gthread", "--threads", "16"],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    data_dir = tempfile.mkdtemp(prefix="circus-streams-")
    try:
        token = prepare(data_dir)
        for name in args.configs.split(","):
            measure(name, CONFIGS[name], args, data_dir, token)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()

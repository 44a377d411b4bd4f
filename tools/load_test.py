"""Load test of ``recsys-kd serve``: concurrent clients (and optional slow ones) against a running server.

A benchmark, not a test: it prints figures and asserts nothing.

The server runs in its own process (``python -m recsys_kd.cli serve``, so that the clients' threads do
not share its interpreter lock), on an artifact given with ``--artifact`` or else a tiny synthetic one
built here (Criteo-shaped synthetic data, 13 dense + 26 sparse features, an untrained DeepFM with
visible random tables, exported with ``export_artifact``; reused from ``--workdir``). ``--url`` targets a
server already running instead.

``--clients`` threads each send ``POST /predict`` requests of ``--batch`` random instances (ids drawn in
``[0, num_embeddings)``, dense values inside the server's ``dense_range``), one connection per request
as the server answers HTTP/1.0, back to back for ``--seconds``. ``--slow-clients`` threads meanwhile
play slowloris: open a connection and send one header line every ``--slow-interval`` seconds until
the server cuts them off (its whole-request deadline), then start over.

Printed: requests sent, answers by status, connection errors, requests/s, latency p50 / p90 / p99 /
max (connect to last byte), the slowest connect, and how long the server let each slow client hold a
connection.

    .venv/bin/python tools/load_test.py [--clients 16] [--seconds 10] [--slow-clients 4] [--workers 8]
    .venv/bin/python tools/load_test.py --artifact runs/demo/artifacts/student_dagfm.pt --batch 32
    .venv/bin/python tools/load_test.py --url http://127.0.0.1:8080 --clients 32
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

PROJECT = Path(__file__).resolve().parents[1]


def build_synthetic_artifact(workdir: Path) -> Path:
    """A tiny Criteo-shaped artifact: synthetic data, an untrained DeepFM with visible tables, exported."""
    path = workdir / "deepfm.pt"
    if path.exists():
        return path
    import torch
    import torch.distributed.checkpoint as dcp

    from recsys_kd.config import to_dict
    from recsys_kd.data.prepare import PrepareConfig, prepare
    from recsys_kd.data.schema import Schema
    from recsys_kd.data.synthetic import SyntheticConfig
    from recsys_kd.export import export_artifact
    from recsys_kd.models import ModelConfig, build_model

    dataset = workdir / "data"
    prepare(PrepareConfig(format="synthetic", output=str(dataset), progress=False,
                          synthetic=SyntheticConfig(rows=4000, sparse_features=26, dense_features=13, max_vocab=1000)))
    config = ModelConfig(name="deepfm", embedding_dim=16, mlp_layers=[64, 32])
    torch.manual_seed(0)
    model = build_model(Schema.load(dataset), config)
    with torch.no_grad():  # the default init (std 1e-4) gives a near-constant model
        for key, parameter in model.named_parameters():
            if ".embedding_bags." in key:
                parameter.normal_(0.0, 0.5)
    output = workdir / "train"
    state = {f"model.{key}": value for key, value in model.eval().state_dict().items()}
    dcp.save({"model": state}, checkpoint_id=str(output / "checkpoints" / "best"), no_dist=True)
    record = {"config": {"model": to_dict(config)}, "dataset": str(dataset), "test": {"auc": 0.5, "logloss": 0.7}}
    (output / "train.json").write_text(json.dumps(record))
    export_artifact(output, path, parity_rows=64)
    return path


def start_server(artifact: Path, options: List[str]) -> Tuple[subprocess.Popen, str]:
    """``recsys-kd serve`` on a free port, in its own process; returns it and its base URL."""
    process = subprocess.Popen([sys.executable, "-m", "recsys_kd.cli", "serve", str(artifact), "--port", "0", *options],
                               cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = process.stdout.readline()
    if "serving" not in line:
        process.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    print(line.strip())
    return process, "http://" + line.split("http://", 1)[1].split(": POST", 1)[0]


def make_payloads(health: Dict[str, Any], batch: int, count: int, seed: int = 0) -> List[bytes]:
    """``count`` request bodies of ``batch`` random instances each, by the server's own contract."""
    features = health["features"]
    low, high = features.get("dense_range") or (0.0, 5.0)
    low, high = max(low, 0.0), min(high, 5.0)  # the transformed values' usual span
    rng = random.Random(seed)
    bodies = []
    for _ in range(count):
        instances = []
        for _ in range(batch):
            instance: Dict[str, Any] = {name: rng.uniform(low, high) for name in features["dense"]}
            for feature in features["sparse"]:
                draw = lambda: rng.randrange(feature["num_embeddings"])  # noqa: E731
                instance[feature["name"]] = [draw() for _ in range(rng.randrange(4))] if feature["multi_hot"] else draw()
            instances.append(instance)
        bodies.append(json.dumps({"instances": instances}).encode())
    return bodies


def post(host: str, port: int, body: bytes, timeout: float) -> Tuple[float, float, Optional[int]]:
    """One request on a fresh connection: (connect seconds, total seconds, status or None)."""
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=timeout) as connection:
        connected = time.perf_counter() - started
        connection.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n" % len(body) + body)
        answer = connection.makefile("rb").read()
    total = time.perf_counter() - started
    try:
        return connected, total, int(answer.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return connected, total, None


def client(host: str, port: int, bodies: List[bytes], stop: float, timeout: float, results: List[Any]) -> None:
    index = 0
    while time.monotonic() < stop:
        try:
            results.append(post(host, port, bodies[index % len(bodies)], timeout))
        except OSError as error:
            results.append(type(error).__name__)
        index += 1


def slow_client(host: str, port: int, interval: float, stop: float, held: List[float]) -> None:
    """Slowloris: a header line every ``interval`` seconds until the server closes the connection."""
    while time.monotonic() < stop:
        try:
            connection = socket.create_connection((host, port), timeout=30)
        except OSError:
            time.sleep(interval)
            continue
        with connection:
            started = time.monotonic()
            connection.settimeout(interval)
            line, cut = 0, False
            try:
                connection.sendall(b"POST /predict HTTP/1.1\r\n")
                while not cut and time.monotonic() < stop:
                    try:
                        cut = not connection.recv(4096)  # an answer (408, 503), then the close
                    except socket.timeout:
                        connection.sendall(b"X-Slow-%d: y\r\n" % line)
                        line += 1
            except OSError:  # reset or broken pipe: the server closed it
                cut = True
            if cut:
                held.append(time.monotonic() - started)


def percentile(values: List[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, help="a serving artifact (default: a tiny synthetic one)")
    parser.add_argument("--url", help="a server already running, e.g. http://127.0.0.1:8080")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "recsys_kd_load_test")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--slow-clients", type=int, default=0)
    parser.add_argument("--slow-interval", type=float, default=1.0, help="seconds between a slow client's lines")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=1, help="instances per request")
    parser.add_argument("--timeout", type=float, default=30.0, help="a client's socket timeout")
    parser.add_argument("--workers", type=int, help="server option (default: the server's)")
    parser.add_argument("--queue-size", type=int, help="server option")
    parser.add_argument("--backlog", type=int, help="server option")
    parser.add_argument("--max-connections", type=int, help="server option")
    parser.add_argument("--request-timeout", type=float, help="server option")
    args = parser.parse_args()
    options = {name: value for name, value in vars(args).items()
               if name in ("workers", "queue_size", "backlog", "max_connections", "request_timeout") and value is not None}
    figures = measure(args.url, args.artifact, args.workdir, args.clients, args.slow_clients, args.slow_interval,
                      args.seconds, args.batch, args.timeout, options)
    health = figures["health"]
    print(f"server: {health['model']}, workers {health.get('workers')}, queue {health.get('queue_size')}, "
          f"backlog {health.get('backlog')}, connections {health.get('max_connections')}, "
          f"request deadline {health.get('request_timeout_s')} s")
    print(f"load: {args.clients} clients + {args.slow_clients} slow, batch {args.batch}, {figures['seconds']:.1f} s, "
          f"{os.cpu_count()} cpus")
    print(f"requests sent: {figures['sent']}   answered 200: {figures['ok']}   errors: {figures['errors']} "
          f"(statuses {figures['statuses']}, connection errors {figures['connection_errors']})")
    print(f"throughput: {figures['ok'] / figures['seconds']:.0f} requests/s, "
          f"{figures['ok'] * args.batch / figures['seconds']:.0f} instances/s")
    print(f"latency ms (200s): p50 {figures['p50_ms']:.2f}  p90 {figures['p90_ms']:.2f}  "
          f"p99 {figures['p99_ms']:.2f}  max {figures['max_ms']:.2f}")
    print(f"slowest connect: {figures['slowest_connect_ms']:.1f} ms")
    if args.slow_clients:
        held = figures["slow_held_s"]
        print(f"slow clients: {len(held)} connections closed by the server, held {percentile(held, 50):.2f} s median, "
              f"{max(held, default=float('nan')):.2f} s max")


def measure(url: Optional[str], artifact: Optional[Path], workdir: Path, clients: int, slow_clients: int,
            slow_interval: float, seconds: float, batch: int, timeout: float,
            server_options: Dict[str, Any]) -> Dict[str, Any]:
    """Runs the load (starting a server on ``artifact``, or a tiny synthetic one, unless ``url`` names a
    running one) and returns its figures: requests sent, answered 200, errors, latency percentiles."""
    process = None
    if url:
        url = url.rstrip("/")
    else:
        workdir.mkdir(parents=True, exist_ok=True)
        artifact = artifact or build_synthetic_artifact(workdir)
        options = [f"--{name.replace('_', '-')}={value}" for name, value in server_options.items()]
        process, url = start_server(artifact, options)
    try:
        with urllib.request.urlopen(url + "/health", timeout=10) as response:
            health = json.loads(response.read())
        host, port = url.split("://", 1)[1].rsplit(":", 1)
        bodies = make_payloads(health, batch, 64)
        results: List[Any] = []
        held: List[float] = []
        stop = time.monotonic() + seconds
        threads = [threading.Thread(target=slow_client, args=(host, int(port), slow_interval, stop, held))
                   for _ in range(slow_clients)]
        threads += [threading.Thread(target=client, args=(host, int(port), bodies, stop, timeout, results))
                    for _ in range(clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)
    answered = [r for r in results if isinstance(r, tuple)]
    statuses = Counter(r[2] for r in answered)
    failures = Counter(r for r in results if isinstance(r, str))
    ok = [r[1] * 1000 for r in answered if r[2] == 200]
    return {
        "health": health, "seconds": elapsed, "sent": len(results), "ok": len(ok),
        "errors": sum(n for status, n in statuses.items() if status != 200) + sum(failures.values()),
        "statuses": dict(sorted((str(k), v) for k, v in statuses.items() if k != 200)),
        "connection_errors": dict(failures),
        "p50_ms": percentile(ok, 50), "p90_ms": percentile(ok, 90), "p99_ms": percentile(ok, 99),
        "max_ms": max(ok, default=float("nan")),
        "slowest_connect_ms": max((r[0] * 1000 for r in answered), default=float("nan")), "slow_held_s": held,
    }

if __name__ == "__main__":
    main()

"""Load test of ``recsys-kd serve``: concurrent clients (and optional slow ones) against a running server.

A benchmark, not a test: it prints figures and asserts nothing.

The server runs in its own process (``python -m recsys_kd.cli serve``, so that the clients' threads do
not share its interpreter lock), on an artifact given with ``--artifact`` or else a tiny synthetic one
built here (Criteo-shaped synthetic data, 13 dense + 26 sparse features, an untrained DeepFM with
visible random tables, exported with ``export_artifact``; reused from ``--workdir``). ``--url`` targets a
server already running instead.

``--clients`` threads (one or more levels, e.g. ``--clients 1 8 32``, run one after the other against
the same server) each send ``POST /predict`` requests of ``--batch`` random instances (ids drawn in
``[0, num_embeddings)``, dense values inside the server's ``dense_range``), one connection per request
as the server answers HTTP/1.0, back to back for ``--seconds``. ``--slow-clients`` threads meanwhile
play slowloris: open a connection and send one header line every ``--slow-interval`` seconds until
the server cuts them off (its whole-request deadline), then start over.

Printed per level: requests sent, answers by status, connection errors, requests/s and rows/s,
latency p50 / p90 / p99 / max (connect to last byte), the slowest connect, the server's model calls
(its micro-batches: requests per call, and the share of the wall time its model thread spent in the
model, from ``/health``: what is left is HTTP, JSON and checks), and how long the server let each
slow client hold a connection. With ``--artifact-rate`` (default on when the server is started here)
the artifact's own batch-``--artifact-batch`` rows/s is measured first, in this process at one torch
thread on the same random rows, and each level's rows/s is given as a share of it.

    .venv/bin/python tools/load_test.py [--clients 16] [--seconds 10] [--slow-clients 4] [--workers 8]
    .venv/bin/python tools/load_test.py --artifact runs/demo/artifacts/student_dagfm.pt --batch 32
    .venv/bin/python tools/load_test.py --url http://127.0.0.1:8080 --clients 32
    .venv/bin/python tools/load_test.py --artifact runs/bench_serving/artifacts/dagfm_outer.pt --clients 1 8 32 --workers 32
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


def artifact_rate(artifact: Path, health: Dict[str, Any], batch: int, calls: int = 5) -> float:
    """Rows/s of the artifact itself (``load_artifact``, one torch thread) on ``batch`` random rows drawn
    as the payloads are (one id per bag), median of ``calls`` calls."""
    import torch

    from recsys_kd.export.artifact import load_artifact

    torch.set_num_threads(1)
    module, _ = load_artifact(artifact)
    features = health["features"]
    low, high = features.get("dense_range") or (0.0, 5.0)
    low, high = max(low, 0.0), min(high, 5.0)
    generator = torch.Generator().manual_seed(0)
    dense = low + (high - low) * torch.rand(batch, len(features["dense"]), generator=generator)
    limits = torch.tensor([f["num_embeddings"] for f in features["sparse"]])
    ids = (torch.rand(batch, len(limits), generator=generator) * limits).long().reshape(-1)
    offsets = torch.arange(ids.numel() + 1)
    times = []
    with torch.no_grad():
        module(dense, ids, offsets)
        for _ in range(calls):
            started = time.perf_counter()
            module(dense, ids, offsets)
            times.append(time.perf_counter() - started)
    return batch / sorted(times)[len(times) // 2]


def percentile(values: List[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, help="a serving artifact (default: a tiny synthetic one)")
    parser.add_argument("--url", help="a server already running, e.g. http://127.0.0.1:8080")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "recsys_kd_load_test")
    parser.add_argument("--clients", type=int, nargs="+", default=[16], help="client levels, run in turn")
    parser.add_argument("--slow-clients", type=int, default=0)
    parser.add_argument("--slow-interval", type=float, default=1.0, help="seconds between a slow client's lines")
    parser.add_argument("--seconds", type=float, default=10.0, help="per level")
    parser.add_argument("--batch", type=int, default=1, help="instances per request")
    parser.add_argument("--timeout", type=float, default=30.0, help="a client's socket timeout")
    parser.add_argument("--artifact-batch", type=int, default=4096, help="batch of the artifact's own rate")
    parser.add_argument("--no-artifact-rate", dest="artifact_rate", action="store_false",
                        help="skip measuring the artifact's own batched rate")
    parser.add_argument("--workers", type=int, help="server option (default: the server's)")
    parser.add_argument("--queue-size", type=int, help="server option")
    parser.add_argument("--backlog", type=int, help="server option")
    parser.add_argument("--max-connections", type=int, help="server option")
    parser.add_argument("--request-timeout", type=float, help="server option")
    parser.add_argument("--batch-wait-ms", type=float, help="server option: micro-batch wait")
    parser.add_argument("--max-batch-rows", type=int, help="server option: micro-batch rows")
    args = parser.parse_args()
    names = ("workers", "queue_size", "backlog", "max_connections", "request_timeout", "batch_wait_ms", "max_batch_rows")
    options = {name: value for name, value in vars(args).items() if name in names and value is not None}
    process, url, artifact = None, args.url, args.artifact
    if url is None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        artifact = artifact or build_synthetic_artifact(args.workdir)
        process, url = start_server(artifact, [f"--{name.replace('_', '-')}={value}" for name, value in options.items()])
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=10) as response:
            health = json.loads(response.read())
        rate = artifact_rate(artifact, health, args.artifact_batch) if artifact and args.artifact_rate else None
        levels = [measure(url, None, args.workdir, clients, args.slow_clients, args.slow_interval, args.seconds,
                          args.batch, args.timeout, options) for clients in args.clients]
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)
    print(f"# load_test  {time.strftime('%Y-%m-%d %H:%M %Z')}  {os.cpu_count()} cpus  load average "
          f"{os.getloadavg()[0]:.1f}  server: {health['model']}, workers {health.get('workers')}, queue "
          f"{health.get('queue_size')}, micro-batches <= {(health.get('batching') or {}).get('max_rows')} rows, wait <= "
          f"{(health.get('batching') or {}).get('max_wait_ms')} ms; {args.batch} instance(s) per request, "
          f"{args.seconds:g} s per level, {args.slow_clients} slow clients")
    if rate is not None:
        print(f"# artifact alone, batch {args.artifact_batch}, 1 thread: {rate:,.0f} rows/s")
    print("| clients | requests/s | rows/s | % of artifact rate | p50 ms | p90 ms | p99 ms | max ms | errors | "
          "requests per model call | model thread busy |")
    print("|--------:|-----------:|-------:|-------------------:|-------:|-------:|-------:|-------:|-------:|"
          "------------------------:|------------------:|")
    for clients, figures in zip(args.clients, levels):
        rows_per_s = figures["ok"] * args.batch / figures["seconds"]
        share = f"{100 * rows_per_s / rate:.1f}" if rate else "-"
        print(f"| {clients} | {figures['ok'] / figures['seconds']:,.0f} | {rows_per_s:,.0f} | {share} | "
              f"{figures['p50_ms']:.2f} | {figures['p90_ms']:.2f} | {figures['p99_ms']:.2f} | {figures['max_ms']:.2f} | "
              f"{figures['errors']} | {figures['requests_per_call']:.1f} | {100 * figures['model_busy']:.0f}% |")
        if figures["errors"]:
            print(f"  errors at {clients} clients: statuses {figures['statuses']}, connection errors "
                  f"{figures['connection_errors']}")
    if args.slow_clients:
        held = [h for figures in levels for h in figures["slow_held_s"]]
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
        before = health.get("batching") or {}
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
        with urllib.request.urlopen(url + "/health", timeout=10) as response:
            after = json.loads(response.read()).get("batching") or {}
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
        "requests_per_call": (after.get("requests", 0) - before.get("requests", 0))
        / max(1, after.get("calls", 0) - before.get("calls", 0)),
        "model_busy": (after.get("model_seconds", 0.0) - before.get("model_seconds", 0.0)) / elapsed,
    }

if __name__ == "__main__":
    main()

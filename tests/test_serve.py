"""serve: the HTTP JSON endpoint on an ephemeral port, good requests against the artifact's own output,
every refused request (4xx with a JSON message naming instance and field), dense bounds and non-finite
model outputs (never a bare NaN), /health, the multi-hot contract, the server under load (a slowloris
client cut off at the whole-request deadline, 16 concurrent clients without a connect stall, 503 when
the worker pool and its queue are full), and a graceful SIGTERM shutdown of `recsys-kd serve`."""

import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pyarrow.parquet as pq
import pytest
import torch

from recsys_kd.cli import main
from recsys_kd.data.prepare import PrepareConfig, prepare
from recsys_kd.data.schema import Schema
from recsys_kd.data.synthetic import SyntheticConfig
from recsys_kd.export import ServingModel, export_artifact, load_artifact, script_serving
from recsys_kd.export.artifact import _input_contract
from recsys_kd.export.batching import MicroBatcher
from recsys_kd.export.server import Predictor, RequestError, make_server
from tests.helpers import fake_train_output, tiny_schema, visible_model

pytestmark = pytest.mark.usefixtures("one_thread")
PROJECT = Path(__file__).resolve().parents[1]
MAX_BODY = 20_000
MAX_INSTANCES = 50


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Dict[str, Any]:
    root = tmp_path_factory.mktemp("serve")
    dataset = root / "data"
    prepare(PrepareConfig(format="synthetic", output=str(dataset), progress=False,
                          synthetic=SyntheticConfig(rows=2000, sparse_features=5, dense_features=2, max_vocab=100)))
    path = root / "deepfm.pt"
    export_artifact(fake_train_output(root, dataset, "deepfm"), path, parity_rows=64)
    schema = Schema.load(dataset)
    rows = pq.read_table(dataset / schema.split("test").files[0]).slice(0, 20).to_pylist()
    instances = [{name: row[name] for name in [*schema.dense, *schema.sparse_names]} for row in rows]
    return {"path": path, "schema": schema, "instances": instances}


@pytest.fixture(scope="module")
def server(artifact):
    server = make_server(artifact["path"], port=0, max_body_bytes=MAX_BODY, max_instances=MAX_INSTANCES, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def _request(server, method: str, path: str, body: Optional[bytes] = None,
             headers: Optional[Dict[str, str]] = None) -> Tuple[int, Dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.getheader("Content-Type") == "application/json"
        return response.status, _strict_json(response.read())
    finally:
        connection.close()


def _strict_json(data: bytes) -> Any:
    """JSON as a strict parser reads it: a bare NaN or Infinity is an error."""
    def reject(constant: str) -> Any:
        raise AssertionError(f"{constant} in an answer: not valid JSON: {data[:200]!r}")
    return json.loads(data, parse_constant=reject)


def _predict(server, payload: Any) -> Tuple[int, Dict[str, Any]]:
    return _request(server, "POST", "/predict", json.dumps(payload).encode())


def _direct(artifact: Dict[str, Any], instances: List[Dict[str, Any]]) -> List[float]:
    """The artifact's own probabilities for instances (single-valued features: the id matrix)."""
    module, _ = load_artifact(artifact["path"])
    schema = artifact["schema"]
    dense = torch.tensor([[i[name] for name in schema.dense] for i in instances], dtype=torch.float32)
    ids = torch.tensor([[i[name] for name in schema.sparse_names] for i in instances], dtype=torch.int64).reshape(-1)
    with torch.no_grad():
        return module(dense, ids, torch.arange(ids.numel() + 1)).tolist()


def test_predictions_equal_the_artifacts_own(server, artifact) -> None:
    instances = artifact["instances"]
    status, body = _predict(server, {"instances": instances})
    assert status == 200 and body["model"] == "deepfm"
    expected = _direct(artifact, instances)
    assert body["probabilities"] == pytest.approx(expected, abs=1e-6)
    assert len(set(round(p, 6) for p in expected)) > 1  # not a constant model
    status, body = _predict(server, {"instances": instances[3:4]})  # one instance alone: its row of the batch
    assert status == 200 and body["probabilities"] == pytest.approx(expected[3:4], abs=1e-6)
    status, body = _request(server, "POST", "/predict", json.dumps({"instances": instances[:2]}).encode(),
                            headers={})  # no Content-Type: JSON assumed
    assert status == 200 and len(body["probabilities"]) == 2


def test_concurrent_requests_get_their_own_answers(server, artifact) -> None:
    instances = artifact["instances"]
    expected = _direct(artifact, instances)
    answers: Dict[int, List[float]] = {}

    def client(index: int) -> None:  # each client sends a different slice, several times
        for _ in range(5):
            status, body = _predict(server, {"instances": instances[index:index + 3]})
            assert status == 200
            answers.setdefault(index, []).extend(body["probabilities"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(answers) == list(range(8))
    for index, got in answers.items():
        assert got == pytest.approx(expected[index:index + 3] * 5, abs=1e-6)


def test_queued_requests_share_one_model_call_and_get_their_own_rows() -> None:
    """While the model thread is busy, three requests queue up; the next call takes all three at once
    (their example-major bags concatenated, offsets shifted) and hands each its own rows."""
    features = 2
    calls: List[int] = []
    entered, gate = threading.Event(), threading.Event()

    def module(dense: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        entered.set()
        gate.wait(10)
        calls.append(int(dense.size(0)))
        starts = offsets[:-1:features]
        ends = offsets[features::features]
        return torch.stack([ids[s:e].sum() for s, e in zip(starts.tolist(), ends.tolist())]).float() + dense[:, 0]

    def request(rows: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        lengths = torch.randint(0, 3, (rows * features,), generator=generator)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
        return torch.randn(rows, 1, generator=generator), torch.randint(0, 50, (int(offsets[-1]),), generator=generator), offsets

    requests = [request(rows, seed) for seed, rows in enumerate([1, 3, 1, 2])]
    batcher = MicroBatcher(module, max_rows=64, max_wait_s=0.001)
    answers: Dict[int, torch.Tensor] = {}

    def send(index: int) -> None:
        with batcher.arriving() as arrival:
            answers[index] = batcher.run(*requests[index], arrival)

    first = threading.Thread(target=send, args=(0,))
    first.start()
    assert entered.wait(10)  # the model thread is inside the first call, held at the gate
    deadline = time.monotonic() + 10
    others = [threading.Thread(target=send, args=(i,)) for i in (1, 2, 3)]
    for thread in others:
        thread.start()
    while len(batcher._jobs) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.set()
    for thread in [first, *others]:
        thread.join(timeout=10)
    batcher.close()
    assert calls == [1, 6] and batcher.stats()["requests"] == 4
    for index, inputs in enumerate(requests):
        torch.testing.assert_close(answers[index], module(*inputs))


def test_health_reports_model_metadata(server, artifact) -> None:
    status, body = _request(server, "GET", "/health")
    _, metadata = load_artifact(artifact["path"])
    schema = artifact["schema"]
    assert status == 200 and body["status"] == "ok" and body["model"] == "deepfm"
    assert body["parameters"] == metadata["model"]["parameters"] and body["parameters"]["total"] > 0
    assert body["flops_per_example"] == metadata["model"]["flops_per_example"] > 0
    assert body["storage_dtype"] == "float32" and body["source"]["checkpoint"].endswith("best")
    assert body["compression"] == metadata["model"]["compression"] == []  # trained, not compressed
    assert body["field_order"] == [*schema.dense, *schema.sparse_names]
    assert [f["name"] for f in body["features"]["sparse"]] == schema.sparse_names
    assert body["features"]["dense"] == schema.dense and body["features"]["dense_used"] is True
    assert body["max_body_bytes"] == MAX_BODY and body["max_instances"] == MAX_INSTANCES


def _bad_instances(artifact) -> List[Tuple[str, Any, int, Optional[int], Optional[str]]]:
    """(what, payload, status, instance, field) of requests the server must refuse."""
    good = artifact["instances"][0]
    schema = artifact["schema"]
    sparse, dense = schema.sparse[1], schema.dense[0]
    limit = sparse.num_embeddings

    def changed(**fields: Any) -> Dict[str, Any]:
        instance = dict(good)
        for name, value in fields.items():
            if value is _DROP:
                del instance[name]
            else:
                instance[name] = value
        return {"instances": [good, instance]}

    return [
        ("top level is a list", [good], 400, None, None),
        ("unknown top-level key", {"instances": [good], "model": "x"}, 400, None, None),
        ("instances not a list", {"instances": good}, 400, None, "instances"),
        ("no instances", {"instances": []}, 400, None, "instances"),
        ("instance not an object", {"instances": [good, [1, 2]]}, 400, 1, None),
        ("missing sparse feature", changed(**{sparse.name: _DROP}), 400, 1, sparse.name),
        ("missing dense feature", changed(**{dense: _DROP}), 400, 1, dense),
        ("extra feature", changed(clicks=3), 400, 1, "clicks"),
        ("id as a string", changed(**{sparse.name: "12"}), 400, 1, sparse.name),
        ("id as a float", changed(**{sparse.name: 3.0}), 400, 1, sparse.name),
        ("id as a boolean", changed(**{sparse.name: True}), 400, 1, sparse.name),
        ("list for a single-valued feature", changed(**{sparse.name: [3]}), 400, 1, sparse.name),
        ("id = num_embeddings", changed(**{sparse.name: limit}), 400, 1, sparse.name),
        ("negative id", changed(**{sparse.name: -1}), 400, 1, sparse.name),
        ("huge id", changed(**{sparse.name: 2 ** 70}), 400, 1, sparse.name),
        ("dense as a string", changed(**{dense: "0.5"}), 400, 1, dense),
        ("dense null", changed(**{dense: None}), 400, 1, dense),
        ("dense beyond float32", changed(**{dense: 1e39}), 400, 1, dense),
        ("dense huge integer", changed(**{dense: 10 ** 400}), 400, 1, dense),
        ("too many instances", {"instances": [good] * (MAX_INSTANCES + 1)}, 413, None, None),
    ]


_DROP = object()


def test_bad_requests_get_4xx_naming_instance_and_field(server, artifact) -> None:
    for what, payload, status, instance, field in _bad_instances(artifact):
        got, body = _predict(server, payload)
        assert got == status, (what, body)
        assert isinstance(body["error"], str) and body["error"], what
        assert body.get("instance") == instance and body.get("field") == field, (what, body)
        if field is not None and field != "instances":
            assert repr(field) in body["error"], (what, body)
    sparse = artifact["schema"].sparse[1]
    _, body = _predict(server, _bad_instances(artifact)[12][1])
    assert body["error"] == (f"instance 1: feature {sparse.name!r} has id {sparse.num_embeddings}, outside "
                             f"[0, {sparse.num_embeddings}) (num_embeddings; 0 = missing, 1 = out of vocabulary)")
    # the server is still up and right after every refusal
    assert _predict(server, {"instances": artifact["instances"][:1]})[0] == 200


def test_malformed_bodies_methods_and_paths(server) -> None:
    cases = [
        ("POST", "/predict", b'{"instances": [', None, 400, "malformed JSON"),
        ("POST", "/predict", b'{"instances": [{"a": NaN}]}', None, 400, "NaN is not valid JSON"),
        ("POST", "/predict", b"\xff\xfe", None, 400, "not UTF-8"),
        ("POST", "/predict", b"[" * 100_00 + b"]" * 100_00, None, 400, "malformed JSON"),
        ("POST", "/predict", b"{}", {"Content-Type": "text/plain"}, 415, "application/json"),
        ("POST", "/predict", b"x" * (MAX_BODY + 1), None, 413, f"exceeds the limit of {MAX_BODY} bytes"),
        ("GET", "/nope", None, None, 404, "no such path"),
        ("GET", "/predict", None, None, 405, "use POST"),
        ("POST", "/health", b"{}", None, 405, "use GET"),
        ("PUT", "/predict", b"{}", None, 405, "not allowed"),
        ("DELETE", "/predict", None, None, 405, "not allowed"),
    ]
    for method, path, body, headers, status, message in cases:
        got, answer = _request(server, method, path, body, headers or {"Content-Type": "application/json"})
        assert got == status and message in answer["error"], (method, path, body[:20] if body else None, answer)


def test_a_body_without_content_length_is_refused(server) -> None:
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as connection:
        connection.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        answer = connection.makefile("rb").read().decode()
    assert answer.startswith("HTTP/1.0 411") and "Content-Length header is required" in answer


def test_multi_hot_contract() -> None:
    schema = tiny_schema(with_hour=False)  # user (11), tags (7, multi-hot), item (13); dense d0, d1
    serving = ServingModel.from_model(visible_model(schema, "deepfm"), num_dense_inputs=2)
    module = script_serving(serving)
    metadata = {"model": {"model": "deepfm", "input": _input_contract(schema, serving, 0, 1)}}
    predictor = Predictor(module, metadata, max_instances=8)
    instances = [{"d0": 0.5, "d1": -1, "user": 3, "tags": [1, 6], "item": 12},
                 {"d0": 0.0, "d1": 2.5, "user": 0, "tags": [], "item": 1}]
    dense, ids, offsets = predictor.tensors({"instances": instances})
    assert dense.tolist() == [[0.5, -1.0], [0.0, 2.5]]
    assert ids.tolist() == [3, 1, 6, 12, 0, 1] and offsets.tolist() == [0, 1, 3, 4, 5, 5, 6]
    with torch.no_grad():
        expected = module(dense, ids, offsets).tolist()
    assert predictor.predict({"instances": instances}) == expected
    for tags, message in ((3, "must be a list of ids"), ([1, 7], r"has id 7, outside \[0, 7\)"), ([1, "2"], "integers")):
        with pytest.raises(RequestError, match=message) as error:
            predictor.predict({"instances": [instances[0], {**instances[1], "tags": tags}]})
        assert (error.value.status, error.value.instance, error.value.field) == (400, 1, "tags")


def test_serve_cli_user_errors_exit_2(server, artifact, capsys) -> None:
    assert main(["serve", str(artifact["path"]), "--port", str(server.server_port)]) == 2  # taken by the fixture
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    assert main(["serve", str(artifact["path"]), "--max-instances", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err
    assert main(["serve", str(artifact["path"]), "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert main(["serve", str(artifact["path"]), "--request-timeout", "0"]) == 2
    assert "--request-timeout and --max-dense-abs must be > 0" in capsys.readouterr().err
    assert main(["serve", "missing.pt"]) == 2 and "missing.pt not found" in capsys.readouterr().err


def test_serve_cli_stops_gracefully_on_sigterm(artifact) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "recsys_kd.cli", "serve", str(artifact["path"]), "--port", "0", "--workers", "2",
         "--queue-size", "4", "--backlog", "16", "--max-connections", "8", "--request-timeout", "5"],
        cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        line = process.stdout.readline()
        assert "serving deepfm" in line, (line, process.stderr.read() if process.poll() is not None else "")
        assert "2 workers, queue 4, 8 connections, request deadline 5 s" in line, line
        port = int(line.split("http://127.0.0.1:")[1].split(":")[0])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/health")
        assert connection.getresponse().status == 200
        connection.close()
        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate(timeout=30)
        assert process.returncode == 0 and "server stopped" in stdout
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_dense_values_outside_the_bound_are_refused_and_answers_are_valid_json(server, artifact) -> None:
    good = artifact["instances"][0]
    dense = artifact["schema"].dense[0]
    # the fixture's schema has no dense transform (synthetic): the bound is |x| <= 1e9
    for value in (1e15, -1e15, 1e300, -1e300, 1e9 + 1):
        status, body = _predict(server, {"instances": [good, {**good, dense: value}]})
        assert status == 400 and body["instance"] == 1 and body["field"] == dense, (value, body)
        assert "outside [-1e+09, 1e+09]" in body["error"] and "--max-dense-abs" in body["error"], body
    assert _predict(server, {"instances": [{**good, dense: -1e9}]})[0] == 200  # the bound itself is in
    instance = json.dumps({**good, dense: 0.5})
    for literal, message in (("1e400", "not a finite float32"), ("-1e400", "not a finite float32"),
                             ("-Infinity", "-Infinity is not valid JSON"), ("NaN", "NaN is not valid JSON"),
                             ('"-inf"', "must be a number"), ('"nan"', "must be a number"), ('"1e15"', "must be a number")):
        body = f'{{"instances": [{instance.replace("0.5", literal, 1)}]}}'.encode()
        status, answer = _request(server, "POST", "/predict", body)
        assert status == 400 and message in answer["error"], (literal, answer)
    status, body = _predict(server, {"instances": [{**good, dense: 10 ** 400}]})
    assert status == 400 and "digits" in body["error"] and len(body["error"]) < 200, body  # not 400 digits quoted
    status, body = _request(server, "GET", "/health")
    assert body["features"]["dense_range"] == [-1e9, 1e9]


@contextmanager
def _serving(artifact: Dict[str, Any], **options: Any) -> Iterator[Any]:
    server = make_server(artifact["path"], port=0, quiet=True, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_non_finite_model_output_is_an_error_naming_the_instance(artifact) -> None:
    good = artifact["instances"][0]
    dense = artifact["schema"].dense[0]
    with _serving(artifact, max_dense_abs=3.4e38) as server:  # lets through values that overflow the model
        status, body = _predict(server, {"instances": [good, {**good, dense: 1e30}, good]})
        assert status == 422 and body["instance"] == 1 and "field" not in body, body
        assert body["error"].startswith("instance 1: the model's probability is nan"), body
        status, body = _predict(server, {"instances": [good, {**good, dense: 1e15}]})  # overflows to a finite 0
        assert status == 200 and all(0.0 <= p <= 1.0 for p in body["probabilities"]), body


def test_a_dense_transform_with_a_range_bounds_the_values() -> None:
    schema = tiny_schema(with_hour=False)
    serving = ServingModel.from_model(visible_model(schema, "deepfm"), num_dense_inputs=2)
    contract = _input_contract(schema.replace(dense_transform="log1p(max(v, 0))"), serving, 0, 1)
    predictor = Predictor(script_serving(serving), {"model": {"model": "deepfm", "input": contract}})
    instance = {"d0": 0.0, "d1": 43.6, "user": 3, "tags": [1], "item": 12}
    assert len(predictor.predict({"instances": [instance]})) == 1
    for value in (-0.5, 44.5, 1e15):  # log1p(max(v, 0)) of an int64 count is in [0, 43.67]
        with pytest.raises(RequestError, match=r"outside \[0, 44\], the range of the dense transform") as error:
            predictor.predict({"instances": [instance, {**instance, "d1": value}]})
        assert (error.value.status, error.value.instance, error.value.field) == (400, 1, "d1")


def _post_head(length: int) -> bytes:
    return (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def _trickle(port: int, pieces: List[bytes], every_s: float, give_up_s: float) -> Tuple[float, bytes]:
    """Sends pieces one at a time, ``every_s`` apart, until the server answers or closes; returns the
    seconds from connect to that moment and what it sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=give_up_s) as connection:
        start = time.monotonic()
        for piece in pieces * 1000:
            try:
                connection.sendall(piece)
            except OSError:  # the server closed the connection
                break
            readable, _, _ = select.select([connection], [], [], every_s)
            if readable or time.monotonic() - start > give_up_s:
                break
        ended = time.monotonic() - start
        try:
            answer = connection.makefile("rb").read()
        except OSError:
            answer = b""
    return ended, answer


def test_slowloris_clients_are_cut_off_at_the_request_deadline_and_hold_no_worker(artifact) -> None:
    instances = artifact["instances"][:1]
    with _serving(artifact, workers=1, request_timeout=1.5) as server:
        results: Dict[str, Tuple[float, bytes]] = {}
        headers = [b"POST /predict HTTP/1.1\r\n", *[f"X-Slow-{i}: y\r\n".encode() for i in range(90)]]
        body = json.dumps({"instances": instances}).encode()
        slow = {f"headers {i}": [headers, 0.25] for i in range(4)}
        slow["body"] = [[_post_head(len(body))] + [b" "] * 100, 0.25]
        slow["silent"] = [[b""], 0.25]  # connects and sends nothing
        threads = [threading.Thread(target=lambda what=what, pieces=pieces, every=every: results.setdefault(
            what, _trickle(server.server_port, pieces, every_s=every, give_up_s=6))) for what, (pieces, every) in slow.items()]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        for _ in range(3):  # six slow clients, one worker: normal clients are still answered at once
            started = time.monotonic()
            status, answer = _predict(server, {"instances": instances})
            assert status == 200 and len(answer["probabilities"]) == 1
            assert time.monotonic() - started < 0.5
        for thread in threads:
            thread.join(timeout=10)
        for what in slow:
            ended, answer = results[what]
            assert 1.3 < ended < 1.5 + 1.0, (what, ended)  # the whole-request deadline, not a per-read one
            assert answer.startswith(b"HTTP/1.0 408") and b"within 1.5 s" in answer, (what, answer[:300])
            _strict_json(answer.split(b"\r\n\r\n", 1)[1])
        assert _predict(server, {"instances": instances})[0] == 200


def test_sixteen_concurrent_clients_get_answers_without_a_connect_stall(artifact) -> None:
    instances = artifact["instances"]
    with _serving(artifact) as server:
        barrier = threading.Barrier(16)
        results: List[Tuple[float, int]] = []

        def client(index: int) -> None:
            body = json.dumps({"instances": instances[index % 10:index % 10 + 5]}).encode()
            barrier.wait()
            for _ in range(3):
                started = time.monotonic()
                connection = socket.create_connection(("127.0.0.1", server.server_port), timeout=10)
                connected = time.monotonic() - started
                with connection:
                    connection.sendall(_post_head(len(body)) + body)
                    answer = connection.makefile("rb").read()
                results.append((connected, int(answer.split(b" ", 2)[1])))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert len(results) == 48 and all(status == 200 for _, status in results), results
    assert max(connected for connected, _ in results) < 0.5, sorted(results)[-3:]


def test_a_full_pool_queue_or_read_ahead_answers_503_at_once(artifact) -> None:
    instances = artifact["instances"][:2]
    with _serving(artifact, workers=1, queue_size=1, max_connections=2, request_timeout=1.5) as server:
        assert server.workers == 1 and server.request_queue_size == 128  # the default backlog
        release = threading.Event()
        predict = server.predictor.predict

        def blocked(payload: Any, arrival: Any = None) -> List[float]:
            release.wait(10)
            return predict(payload, arrival)

        server.predictor.predict = blocked  # the only worker is held by the first request
        answers: List[Tuple[int, Dict[str, Any]]] = []
        held = [threading.Thread(target=lambda: answers.append(_predict(server, {"instances": instances})))
                for _ in range(2)]
        for thread in held:  # one in the worker, one in the queue of 1
            thread.start()
            time.sleep(0.3)
        for _ in range(3):
            started = time.monotonic()
            connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
            connection.request("POST", "/predict", body=json.dumps({"instances": instances}).encode(),
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.status == 503 and response.getheader("Retry-After") == "1"
            message = _strict_json(response.read())["error"]
            assert "server busy: all 1 workers and the queue of 1 requests are taken" in message
            connection.close()
            assert time.monotonic() - started < 0.5
        release.set()
        for thread in held:
            thread.join(timeout=10)
        assert [status for status, _ in answers] == [200, 200] and len(answers[0][1]["probabilities"]) == 2
        # two connections still sending fill the read-ahead stage: a third is refused at once
        slow = [threading.Thread(target=_trickle, args=(server.server_port, [b"P"], 0.25, 6)) for _ in range(2)]
        for thread in slow:
            thread.start()
        time.sleep(0.3)
        started = time.monotonic()
        status, body = _predict(server, {"instances": instances})
        assert status == 503 and "2 connections are already sending" in body["error"], body
        assert time.monotonic() - started < 0.5
        for thread in slow:
            thread.join(timeout=10)
        status, body = _request(server, "GET", "/health")
        assert (body["workers"], body["queue_size"], body["backlog"], body["max_connections"],
                body["request_timeout_s"]) == (1, 1, 128, 2, 1.5)


def test_a_request_too_big_to_read_ahead_is_read_by_its_worker_under_the_same_deadline(artifact, monkeypatch) -> None:
    from recsys_kd.export import http_pool

    post = b"POST / HTTP/1.0\r\n"
    assert http_pool.request_end(b"GET / HTTP/1.0\r\nHost: x\r\n", 100) is None  # head not over yet
    for head, body_bytes in ((b"GET / HTTP/1.0\r\n\r\n", 0), (b"GET / HTTP/1.0\n\n", 0),
                             (post + b"content-length: 7\r\n\r\n", 7),
                             (post + b"Content-Length: 700\r\n\r\n", 0),  # over the limit: refused unread
                             (post + b"Content-Length: 7\r\nTransfer-Encoding: chunked\r\n\r\n", 0)):
        assert http_pool.request_end(head + b"x" * 10, 100) == len(head) + body_bytes, head
    monkeypatch.setattr(http_pool, "READ_AHEAD_BYTES", 64)  # every request goes to a worker as it stands
    instances = artifact["instances"][:3]
    body = json.dumps({"instances": instances}).encode()
    with _serving(artifact, workers=2, request_timeout=1.5) as server:
        assert _predict(server, {"instances": instances})[0] == 200
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as connection:
            connection.sendall(_post_head(len(body)) + body[:100])
            time.sleep(0.3)  # the worker waits for the rest
            connection.sendall(body[100:])
            answer = connection.makefile("rb").read()
        assert answer.startswith(b"HTTP/1.0 200") and len(_strict_json(answer.split(b"\r\n\r\n", 1)[1])["probabilities"]) == 3
        ended, answer = _trickle(server.server_port, [_post_head(len(body))] + [b" "] * 100, every_s=0.25, give_up_s=6)
        assert 1.3 < ended < 2.5 and answer.startswith(b"HTTP/1.0 408"), (ended, answer[:300])
        assert b"within 1.5 s" in answer and _strict_json(answer.split(b"\r\n\r\n", 1)[1])["error"]

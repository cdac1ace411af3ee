"""Kafka's Celery path (issue 13): kombu's `confluentkafka://` transport against nodi's
Kafka listener, on one real `nodi serve --kafka-port 0` for the module.

- kombu: a SimpleQueue creates its topic (CreateTopics), puts, gets and acks (the ack is
  an OffsetCommit of the queue's consumer group, `<queue>-consumer-group`); a second
  connection resumes after the acked messages, and nodi's own client sees the group's
  committed offset and the messages kombu wrote.
- Celery: a worker in a child process (solo pool, no remote control: the transport has
  no fanout) runs tasks sent through the listener; results go to a file backend. The
  worker is stopped by its pid, with a bounded wait.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator

import pytest

from nodi.broker import Message
from nodi.broker.client import Client

from conftest import BrokerProcess

kombu = pytest.importorskip("kombu")
celery = pytest.importorskip("celery")
pytest.importorskip("confluent_kafka")

KAFKA_LINE = re.compile(r"nodi kafka listener on ([\d.]+):(\d+)")
TIMEOUT_S = 30


@pytest.fixture(scope="module")
def kafka_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    directory = tmp_path_factory.mktemp("kafka-celery")
    process = BrokerProcess(str(directory / "data"), ["--kafka-port", "0"]).start()
    found = next(KAFKA_LINE.search(line) for line in process.output if KAFKA_LINE.search(line))
    assert found is not None  # next() yields only matches
    drain = threading.Thread(target=_drain, args=(process,), daemon=True)
    drain.start()
    process.bootstrap = f"{found.group(1)}:{found.group(2)}"  # type: ignore[attr-defined]
    yield process
    process.stop()
    drain.join(5)


def _drain(process: BrokerProcess) -> None:
    """The server's output, into process.output as it comes (the pipe never fills)."""
    assert process.process is not None and process.process.stdout is not None
    for line in process.process.stdout:
        process.output.append(line)


def _connection(bootstrap: str):
    # wait_time_seconds: how long one get() polls the consumer (kombu's default is 5 s).
    return kombu.Connection(f"confluentkafka://{bootstrap}", transport_options={"wait_time_seconds": 1})


def _get(queue, timeout_s: float = TIMEOUT_S):
    return queue.get(block=True, timeout=timeout_s)


def _value(message: Message) -> bytes:
    assert message.value is not None, f"no value at offset {message.offset}: kombu writes none"
    return message.value


def test_kombu_puts_gets_acks_and_a_new_connection_resumes_after_the_acked(kafka_server) -> None:
    name = "kombu-round-trip"
    payloads = [{"n": index, "text": f"message {index}", "bytes": "é\u2603"} for index in range(5)]
    with _connection(kafka_server.bootstrap) as connection:
        queue = connection.SimpleQueue(name)
        for payload in payloads[:3]:
            queue.put(payload, headers={"trace": f"t{payload['n']}"})
        got = []
        for _ in range(3):
            message = _get(queue)
            got.append((message.payload, message.headers))
            message.ack()
        queue.close()
    assert got == [(payload, {"trace": f"t{payload['n']}"}) for payload in payloads[:3]]

    with Client(kafka_server.address, timeout_ms=10_000) as client:
        # The acks committed the group's position after the third message.
        assert client.fetch_offsets(f"{name}-consumer-group", [name]) == {(name, 0): 3}
        # What kombu wrote is an ordinary nodi topic: its JSON envelopes, in order.
        stored = [json.loads(_value(message)) for message in client.fetch(name, 0, 0, bytes_max=1 << 20)]
    assert {envelope["properties"]["body_encoding"] for envelope in stored} == {"base64"}
    assert [json.loads(base64.b64decode(envelope["body"])) for envelope in stored] == payloads[:3]

    with _connection(kafka_server.bootstrap) as connection:
        queue = connection.SimpleQueue(name)
        for payload in payloads[3:]:
            queue.put(payload)
        resumed = []
        for _ in range(2):
            message = _get(queue)
            resumed.append(message.payload)
            message.ack()
        queue.close()
    assert resumed == payloads[3:]  # nothing acked came again, nothing was skipped


TASKS = """
    import os

    from celery import Celery

    app = Celery("nodi_celery_test")
    app.conf.update(
        broker_url=os.environ["NODI_TEST_BROKER_URL"],
        result_backend=os.environ["NODI_TEST_RESULT_URL"],
        task_serializer="json",
        broker_connection_retry_on_startup=True,
        # kombu's Kafka transport has no fanout, which remote control needs.
        worker_enable_remote_control=False,
        broker_transport_options={"wait_time_seconds": 1},
    )


    @app.task
    def add(x, y):
        return x + y


    @app.task
    def shout(text, suffix="!"):
        return text.upper() + suffix
"""


def test_a_celery_worker_runs_tasks_sent_through_the_kafka_listener(kafka_server, tmp_path) -> None:
    (tmp_path / "nodi_celery_tasks.py").write_text(textwrap.dedent(TASKS))
    results = tmp_path / "results"
    results.mkdir()
    environment = {
        **os.environ,
        "NODI_TEST_BROKER_URL": f"confluentkafka://{kafka_server.bootstrap}",
        "NODI_TEST_RESULT_URL": f"file://{results}",
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    log = open(tmp_path / "worker.log", "w+")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "nodi_celery_tasks", "worker", "--pool=solo"]
        + ["--without-mingle", "--without-gossip", "--without-heartbeat", "--loglevel=INFO"],
        cwd=tmp_path,
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    sys.path.insert(0, str(tmp_path))
    saved = {key: os.environ.get(key) for key in ("NODI_TEST_BROKER_URL", "NODI_TEST_RESULT_URL")}
    os.environ.update({key: environment[key] for key in saved})
    try:
        import nodi_celery_tasks  # type: ignore[import-not-found]  # written into tmp_path above

        sent = [nodi_celery_tasks.add.delay(index, index * 10) for index in range(6)]
        sent.append(nodi_celery_tasks.shout.delay("nodi", suffix="?"))
        answers = [result.get(timeout=TIMEOUT_S) for result in sent]
        assert answers == [index * 11 for index in range(6)] + ["NODI?"]
        assert all(result.status == "SUCCESS" for result in sent)
        nodi_celery_tasks.app.close()  # its producers, before the broker stops
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("nodi_celery_tasks", None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if worker.poll() is None:
            os.kill(worker.pid, signal.SIGTERM)  # Celery's warm shutdown
            try:
                worker.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.kill(worker.pid, signal.SIGKILL)
                worker.wait(timeout=TIMEOUT_S)
        log.seek(0)
        output = log.read()
        log.close()
    assert "Connected to confluentkafka://" in output, output
    assert output.count("succeeded in") == len(sent), output

"""The request path's pieces (issue 12): a coroutine started eagerly and resumed in a
task behaves as it would in a task from the start (results, a future's failure and
cancel, a cancel of the task, a bare yield); the read loop's one deadline timer raises
TimeoutError inside its block only, moves later without rescheduling, and leaves other
cancels alone; the schema's packed integer runs decode and encode as field by field
did, and still name the field that is wrong; tools/request_path_bench.py --quick runs."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nodi.broker.protocol import messages as m
from nodi.broker.protocol.errors import ErrorCode, ProtocolError
from nodi.broker.protocol.frames import decode_message, encode_message
from nodi.broker.server.eager import resume, start_eagerly
from nodi.broker.server.read_deadline import ReadDeadline

ROOT = Path(__file__).resolve().parent.parent


def test_a_coroutine_that_never_waits_finishes_without_a_task() -> None:
    seen = []

    async def handler() -> None:
        seen.append("ran")

    async def main() -> None:
        assert start_eagerly(handler()) is None

    asyncio.run(main())
    assert seen == ["ran"]


def test_an_exception_before_the_first_wait_is_raised_to_the_starter() -> None:
    async def handler() -> None:
        raise KeyError("bug")

    async def main() -> None:
        with pytest.raises(KeyError):
            start_eagerly(handler())

    asyncio.run(main())


def test_resumed_coroutine_reads_results_failures_and_bare_yields() -> None:
    async def main() -> list:
        loop = asyncio.get_running_loop()
        seen: list = []
        first, second = loop.create_future(), loop.create_future()

        async def handler() -> None:
            seen.append(await first)
            await asyncio.sleep(0)  # a bare yield
            try:
                await second
            except ValueError as error:
                seen.append(f"failed: {error}")
            seen.append(await asyncio.sleep(0.001, "slept"))

        coroutine = handler()
        waiting_on = start_eagerly(coroutine)
        assert waiting_on is first
        task = asyncio.create_task(resume(coroutine, waiting_on))
        await asyncio.sleep(0)
        first.set_result("first")
        await asyncio.sleep(0.01)
        second.set_exception(ValueError("second"))
        await asyncio.wait_for(task, 5)
        return seen

    assert asyncio.run(main()) == ["first", "failed: second", "slept"]


def test_a_cancelled_resumed_task_cancels_the_coroutine_where_it_waits() -> None:
    async def main() -> list:
        loop = asyncio.get_running_loop()
        seen: list = []
        never = loop.create_future()

        async def handler() -> None:
            try:
                await never
            except asyncio.CancelledError:
                seen.append("cancelled where it waited")
                raise

        coroutine = handler()
        task = asyncio.create_task(resume(coroutine, start_eagerly(coroutine)))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert never.cancelled()
        return seen

    assert asyncio.run(main()) == ["cancelled where it waited"]


def test_a_cancel_after_the_future_is_done_is_thrown_into_the_coroutine() -> None:
    async def main() -> list:
        loop = asyncio.get_running_loop()
        seen: list = []
        future = loop.create_future()

        async def handler() -> None:
            try:
                await future
                seen.append("not reached")
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise

        coroutine = handler()
        task = asyncio.create_task(resume(coroutine, start_eagerly(coroutine)))
        await asyncio.sleep(0)
        future.set_result(None)  # the task is woken, and cancelled before it runs
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return seen

    assert asyncio.run(main()) == ["cancelled"]


def test_read_deadline_raises_timeout_inside_its_block() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        deadline = ReadDeadline(loop, task)
        with pytest.raises(TimeoutError):
            with deadline.at(loop.time() + 0.02):
                await asyncio.sleep(5)
        assert task.cancelling() == 0  # its own cancel was taken back
        # Moved later while waiting: the early timer fires, rearms, the block finishes.
        with deadline.at(loop.time() + 0.02):
            deadline.at(loop.time() + 0.2)  # as the read loop moves an idle deadline
            await asyncio.sleep(0.06)
        # A deadline passing outside the block does nothing to the task.
        deadline.at(loop.time() + 0.01)
        await asyncio.sleep(0.05)
        deadline.close()

    asyncio.run(main())


def test_read_deadline_leaves_a_cancel_from_elsewhere_a_cancel() -> None:
    async def reader(deadline_box: list) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        deadline = ReadDeadline(loop, task)
        deadline_box.append(deadline)
        with deadline.at(loop.time() + 5):
            await asyncio.sleep(10)

    async def main() -> None:
        box: list = []
        task = asyncio.create_task(reader(box))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        box[0].close()

    asyncio.run(main())


@pytest.mark.parametrize(
    "message",
    [
        m.ProduceRequest(request_id=7, topic="t", partition=3, acks=m.Acks.WRITTEN, timeout_ms=5, records=b"x" * 70),
        m.FetchRequest(request_id=8, topic="t", partition=0, offset=1 << 40, bytes_max=1, wait_ms=-1, min_bytes=0),
        m.ProduceResponse(request_id=9, base_offset=5, last_offset=9, log_append_time_ms=-1, log_start_offset=0),
        m.CommitOffsetsRequest(
            request_id=10,
            group="g",
            generation=2,
            member_id="m",
            offsets=[m.OffsetCommit(topic="t", partition=1, offset=4)],
        ),
    ],
)
def test_packed_integer_runs_round_trip(message: m.Message) -> None:
    frame = encode_message(message, message.API_VERSION)
    assert decode_message(frame)[1] == message
    for cut in range(14, len(frame)):  # every truncation is a typed error, never another
        shortened = frame[:cut]
        shortened = (len(shortened) - 4).to_bytes(4, "big") + shortened[4:]
        with pytest.raises(ProtocolError):
            decode_message(shortened)


def test_a_packed_run_still_names_the_field_out_of_range_or_of_the_wrong_type() -> None:
    with pytest.raises(ProtocolError, match="partition: 2147483648 is outside int32") as caught:
        encode_message(m.FetchRequest(request_id=1, topic="t", partition=1 << 31, offset=0), 1)
    assert caught.value.code == ErrorCode.INVALID_REQUEST
    with pytest.raises(ProtocolError, match="offset: expected an integer for int64, got bool"):
        encode_message(m.FetchRequest(request_id=1, topic="t", partition=0, offset=True), 1)
    # An IntEnum where an int is declared still encodes (the field-by-field path takes it).
    frame = encode_message(m.FetchRequest(request_id=1, topic="t", partition=m.Acks.DURABLE, offset=0), 1)
    decoded = decode_message(frame)[1]
    assert isinstance(decoded, m.FetchRequest) and decoded.partition == 2


def test_request_path_bench_quick_run_writes_its_json(tmp_path: Path) -> None:
    json_path = tmp_path / "request_path.json"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.request_path_bench",
            "--quick",
            "--requests",
            "120",
            "--json-out",
            str(json_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = json.loads(json_path.read_text())
    for name in ("floor", "list_offsets", "produce_never", "produce_always", "window", "fetch", "commit", "end_to_end"):
        assert results[name]["messages"] == 20  # 120 less the 100 of warm-up
        assert results[name]["server_cpu_us_per_message"] > 0
    assert results["end_to_end"]["requests_per_message"] == 3
    # One request at a time, a durable produce is alone: its fsync runs on the loop
    # (fsync_on_loop_max_ms), while a commit's LMDB transaction runs on the fsync pool.
    assert results["commit"]["threads_cpu_us_per_message"] > 0

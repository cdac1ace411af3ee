"""The crash torture (tools/torture.py, `nodi torture`): a short run against real `nodi
serve` processes killed with SIGKILL finds nothing wrong and checked something; a short
power-loss run (storage level, the simulated disk) likewise; and the checker itself
catches a lost, a changed, a duplicated and a phantom message, a gap, a read the log no
longer holds, a lost commit and a queue ack undone, when fed a doctored history (so it is
not a check that asserts nothing). No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "torture.py"
NODI = [sys.executable, "-m", "nodi.cli.main"]


def load_tool():
    spec = importlib.util.spec_from_file_location("nodi_torture_under_test", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


torture = load_tool()


def run_tool(arguments: list[str], tmp_path: Path, timeout_s: float = 240) -> tuple[subprocess.CompletedProcess, dict]:
    json_path = tmp_path / "summary.json"
    completed = subprocess.run(
        [sys.executable, str(TOOL), *arguments, "--work-dir", str(tmp_path / "work"), "--json", str(json_path)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    summary = json.loads(json_path.read_text()) if json_path.exists() else {}
    return completed, summary


def test_a_short_server_run_checks_acknowledged_messages_and_finds_nothing(tmp_path: Path) -> None:
    completed, summary = run_tool(["--rounds", "2", "--round-s", "0.6", "--rate", "800", "--seed", "7"], tmp_path)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    assert summary["mode"] == "server"
    assert summary["rounds"] == 2 and len(summary["per_round"]) == 2
    assert summary["violations_total"] == 0, summary["examples"]
    assert {summary[kind] for kind in ("lost", "changed", "duplicated", "phantom")} == {0}
    assert summary["acknowledged_checked"] > 0
    assert summary["acknowledged_checked"] == summary["acknowledged"]  # every acknowledgement, checked
    workload = summary["workload"]
    assert workload["acknowledged_by_kind"].get("sync", 0) > 0
    assert workload["acknowledged_by_kind"].get("batch", 0) > 0
    assert workload["queue_deliveries"] > 0 and workload["stream_reads"] > 0
    # The final drain: the queue group was handed every offset (or dead-lettered it).
    assert summary["queue_delivered_offsets"] + summary["dead_lettered"] >= summary["records_checked"]
    assert "lost 0, changed 0, duplicated 0, phantom 0" in completed.stdout


def test_a_short_power_loss_run_checks_acknowledged_appends_and_finds_nothing(tmp_path: Path) -> None:
    completed, summary = run_tool(["--power-loss", "--rounds", "4", "--round-s", "0.3", "--seed", "3"], tmp_path)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    assert summary["mode"] == "power-loss"
    assert summary["rounds"] == 4
    assert summary["violations_total"] == 0, summary["examples"]
    assert summary["acknowledged_checked"] > 0
    assert {round_["crash_mode"] for round_ in summary["per_round"]} <= {"drop", "garble", "reorder"}
    acknowledged = summary["workload"]["acknowledged_by_kind"]
    assert acknowledged.get("log", 0) > 0 and acknowledged.get("log-idempotent", 0) > 0


def test_nodi_torture_runs_the_tool(tmp_path: Path) -> None:
    json_path = tmp_path / "summary.json"
    completed = subprocess.run(
        NODI
        + [
            "torture",
            "--power-loss",
            "--rounds",
            "1",
            "--round-s",
            "0.1",
            "--work-dir",
            str(tmp_path / "w"),
            "--json",
            str(json_path),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert json.loads(json_path.read_text())["rounds"] == 1
    usage = subprocess.run(NODI + ["torture", "--rounds", "0"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "--rounds must be at least 1" in usage.stderr


def test_the_tool_refuses_a_work_dir_with_an_earlier_history(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "history.jsonl").write_text("")
    completed, _ = run_tool(["--power-loss", "--rounds", "1"], tmp_path, timeout_s=60)
    assert completed.returncode == 2 and "earlier run" in completed.stderr


# -- the checker on a doctored history ---------------------------------------------------


def stored(partition: int, offset: int, message_id: str):
    key, value, headers = torture.content_of(message_id)
    return torture.Record(partition, offset, key, value, headers)


def honest_history() -> tuple[list[dict], dict[int, list]]:
    """Six messages on two partitions, all acknowledged: a sync one sent twice (its
    first answer lost), the others once; and the log that holds them."""
    events: list[dict] = []
    log: dict[int, list] = {0: [], 1: []}
    for number, (kind, partition) in enumerate(
        [("sync", 0), ("async", 0), ("batch", 0), ("batch", 1), ("async", 1), ("sync", 1)]
    ):
        message_id = f"r1.{kind}.{number}"
        events.append({"e": "send", "id": message_id, "kind": kind})
        offset = len(log[partition])
        log[partition].append(stored(partition, offset, message_id))
        events.append({"e": "ack", "id": message_id, "p": partition, "o": offset})
    return events, log


def check(events: list[dict], log: dict[int, list]):
    return torture.check_log(torture.Ledger.from_events(events), log)


def test_the_checker_passes_the_honest_history() -> None:
    events, log = honest_history()
    findings = check(events, log)
    assert findings.total == 0, findings.lines()
    assert findings.checked == 6 and findings.records == 6


def test_the_checker_catches_a_lost_message() -> None:
    events, log = honest_history()
    del log[1][1:]  # the acknowledged 1/1 and 1/2 are gone (a cut tail)
    findings = check(events, log)
    assert findings.counts()["lost"] == 2
    assert "r1.async.4 acknowledged at 1/1" in " ".join(findings.found["lost"])


def test_the_checker_catches_a_changed_message() -> None:
    events, log = honest_history()
    record = log[0][1]
    log[0][1] = torture.Record(0, 1, record.key, record.value + b"!", record.headers)
    assert check(events, log).counts()["changed"] == 1
    log[0][1] = torture.Record(0, 1, b"another key", record.value, record.headers)
    assert check(events, log).counts()["changed"] == 1
    log[0][1] = torture.Record(0, 1, record.key, record.value, record.headers + (("x", b"y"),))
    assert check(events, log).counts()["changed"] == 1


@pytest.mark.parametrize("copied", [1, 2])  # async (an idempotency key), batch (idempotent producer)
def test_the_checker_catches_a_duplicate_the_guarantees_forbid(copied: int) -> None:
    events, log = honest_history()
    original = log[0][copied]
    log[0].append(torture.Record(0, 3, original.key, original.value, original.headers))
    findings = check(events, log)
    assert findings.counts()["duplicated"] == 1
    assert findings.total == 1


def test_a_plain_retry_may_duplicate_once_per_attempt_and_no_more() -> None:
    events, log = honest_history()
    events.insert(1, {"e": "send", "id": "r1.sync.0", "kind": "sync"})  # a second attempt
    original = log[0][0]
    log[0].append(torture.Record(0, 3, original.key, original.value, original.headers))
    assert check(events, log).total == 0  # two attempts, two copies: allowed
    log[0].append(torture.Record(0, 4, original.key, original.value, original.headers))
    assert check(events, log).counts()["duplicated"] == 1  # a third copy is not


def test_the_checker_catches_a_phantom_message() -> None:
    events, log = honest_history()
    log[1].append(stored(1, 3, "r9.sync.99"))  # well-formed, never sent
    key, value, headers = torture.content_of("r1.batch.2")
    log[1].append(torture.Record(1, 4, key, b"garbage", ()))  # no id at all
    findings = check(events, log)
    assert findings.counts()["phantom"] == 2
    assert findings.total == 2


def test_the_checker_catches_a_gap_and_reads_the_log_no_longer_holds() -> None:
    events, log = honest_history()
    events.append({"e": "read", "id": "r1.batch.3", "p": 1, "o": 0})
    events.append({"e": "deliver", "id": "r1.sync.5", "p": 1, "o": 2, "n": 1})
    assert check(events, log).total == 0
    log[1][0] = torture.Record(1, 5, *torture.content_of("r1.batch.3"))  # offsets 0..4 missing
    del log[1][1:]
    findings = check(events, log)
    assert findings.counts()["gap"] == 1
    assert findings.counts()["unstable_read"] == 2  # both reads point at offsets now gone
    assert findings.counts()["lost"] == 3


def test_the_incremental_check_remembers_what_it_read_and_reports_once() -> None:
    events, log = honest_history()
    ledger = torture.Ledger.from_events(events)
    view = torture.LogView()
    assert torture.check_log(ledger, log, view=view).total == 0
    # A later round: one new message, and a copy of an idempotent producer's message.
    ledger.add({"e": "send", "id": "r2.batch.0", "kind": "batch"})
    ledger.add({"e": "ack", "id": "r2.batch.0", "p": 0, "o": 3})
    later = {0: [stored(0, 3, "r2.batch.0"), stored(0, 4, "r1.batch.2")], 1: []}
    findings = torture.check_log(ledger, later, view=view)
    assert findings.records == 2 and findings.checked == 7
    assert findings.counts()["duplicated"] == 1
    assert torture.check_log(ledger, {0: [], 1: []}, view=view).total == 0  # not counted again
    view.truncate(0, 2)  # the partition came back shorter: the lost check names what went
    assert torture.check_log(ledger, {0: [], 1: []}, view=view).counts()["lost"] == 2


def test_the_checker_catches_lost_commits_and_undone_queue_acks() -> None:
    events, _ = honest_history()
    events += [{"e": "read", "id": "r1.sync.0", "p": 0, "o": 0}, {"e": "commit", "p": 0, "o": 1}]
    ledger = torture.Ledger.from_events(events)
    assert torture.check_commits(ledger, {0: 1}, {0: 3, 1: 3}).total == 0
    assert torture.check_commits(ledger, {0: 0}, {0: 3, 1: 3}).counts()["commit"] == 1  # answered, not kept
    assert torture.check_commits(ledger, {0: 4}, {0: 3, 1: 3}).counts()["commit"] == 2  # past the end, unread
    assert torture.check_commits(ledger, {1: 2}, {0: 3, 1: 3}).counts()["commit"] == 2  # unread; 0's commit gone

    events += [{"e": "deliver", "id": "r1.sync.0", "p": 0, "o": 0, "n": 1}, {"e": "qack", "p": 0, "o": 0}]
    window = torture.QueueWindow(partition=0, ack_floor=0, next_offset=3, pending=2)
    assert torture.check_queue(torture.Ledger.from_events(events), [window], {0: 3}).total == 0
    crowded = torture.QueueWindow(partition=0, ack_floor=0, next_offset=3, pending=3)
    # More pending than the window leaves room for beside the answered ack.
    assert torture.check_queue(torture.Ledger.from_events(events), [crowded], {0: 3}).counts()["queue"] == 1
    assert torture.check_queue(torture.Ledger.from_events(events), [window], {0: 2}).counts()["queue"] == 1
    redelivered = events + [{"e": "deliver", "id": "r1.sync.0", "p": 0, "o": 0, "n": 2}]
    assert torture.check_queue(torture.Ledger.from_events(redelivered), [], {}).counts()["queue"] == 1
    drained = torture.Ledger.from_events(events)
    done = torture.QueueWindow(0, 3, 3, 0)
    findings = torture.check_drained(drained, [done], {0: 3}, dead_lettered={(0, 1)})
    assert findings.counts()["queue"] == 1  # 0/2: done, but never delivered nor dead-lettered
    assert "0/2" in findings.found["queue"][0]

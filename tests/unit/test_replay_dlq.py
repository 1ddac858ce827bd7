"""``inference-service replay-dlq``: its flags and the choice of dead letters (no Kafka here)."""

from __future__ import annotations

import pytest

from inference_service.cli import build_parser
from inference_service.commands import replay_dlq
from inference_service.commands.replay_dlq import decode_headers, origin, selected


def test_defaults() -> None:
    args = build_parser().parse_args(["replay-dlq"])
    assert args._module is replay_dlq
    assert args.to is None  # the tasks topic, from the settings
    assert args.code == []
    assert args.group == "inference-dlq-replay"
    assert (args.dry_run, args.from_beginning, args.timeout) == (False, False, 60.0)


def test_flags() -> None:
    args = build_parser().parse_args([
        "replay-dlq", "--to", "retry", "--code", "frame_not_found", "--code", "undecodable_frame",
        "--group", "g", "--dry-run", "--from-beginning", "--timeout", "5",
        "--dlq-topic", "tasks.dlq",
    ])  # fmt: skip
    assert (args.to, args.group, args.timeout) == ("retry", "g", 5.0)
    assert args.code == ["frame_not_found", "undecodable_frame"]
    assert args.dry_run and args.from_beginning
    assert args.setting_dlq_topic == "tasks.dlq"  # settings flags as in every command


def test_timeout_must_be_a_number(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["replay-dlq", "--timeout", "soon"])
    assert "--timeout" in capsys.readouterr().err


def test_headers_are_decoded_by_name() -> None:
    raw = [("error.code", b"frame_not_found"), ("error.message", b"\xffbad"), ("empty", None)]
    assert decode_headers(raw) == {
        "error.code": "frame_not_found",
        "error.message": "\ufffdbad",
        "empty": "",
    }
    assert decode_headers({"error.code": b"x"}) == {"error.code": "x"}
    assert decode_headers(None) == {}


def test_selection_by_code_and_truncation() -> None:
    found = {"error.code": "frame_not_found"}
    assert selected(found, [])  # no --code: every dead letter
    assert selected(found, ["frame_not_found", "undecodable_frame"])
    assert not selected(found, ["undecodable_frame"])
    assert not selected({}, ["frame_not_found"])  # no code header: never a chosen code
    assert selected({}, [])
    assert not selected({**found, "value.truncated": ""}, [])  # truncated: never replayed
    assert not selected({**found, "value.truncated": "1"}, ["frame_not_found"])


def test_origin_names_where_the_task_was_consumed() -> None:
    headers = {"source.topic": "inference_tasks", "source.partition": "2", "source.offset": "17"}
    assert origin(headers) == "inference_tasks[2]@17"

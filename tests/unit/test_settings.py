import argparse
import os
from pathlib import Path

import pytest

from inference_devtools import settings_doc as gen_docs
from inference_service.errors import ConfigError
from inference_service.settings import Settings, add_cli_flags, load_settings, overrides_from_args

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def test_defaults_match_the_spec(monkeypatch):
    for name in list(os.environ):
        if name.startswith("INFERENCE_"):
            monkeypatch.delenv(name)
    s = load_settings()
    assert s.kafka_bootstrap_servers == "localhost:9092"
    assert (s.tasks_topic, s.results_topic, s.dlq_topic) == (
        "inference_tasks", "inference_results", "inference_tasks.dlq",
    )  # fmt: skip
    assert s.group_id == "inference-group"
    assert s.delivery == "exactly_once"
    assert s.s3_endpoint_url is None and s.s3_bucket == "frames" and s.s3_region == "us-east-1"
    assert str(s.model) == "best.pt"
    assert (s.conf, s.iou, s.http_port, s.precision) == (0.25, 0.45, 8003, "fp32")
    assert s.workers == "auto"


def test_environment_then_flags(monkeypatch):
    monkeypatch.setenv("INFERENCE_WORKERS", "3")
    monkeypatch.setenv("INFERENCE_DELIVERY", "at_least_once")
    s = load_settings({"workers": "5"})
    assert s.workers == 5 and s.delivery == "at_least_once"


@pytest.mark.parametrize(
    ("var", "value", "needle"),
    [
        ("INFERENCE_DELIVERY", "twice", "INFERENCE_DELIVERY"),
        ("INFERENCE_PRECISION", "fp8", "INFERENCE_PRECISION"),
        ("INFERENCE_WORKERS", "zero", "INFERENCE_WORKERS"),
        ("INFERENCE_CONF", "2", "INFERENCE_CONF"),
        ("INFERENCE_HTTP_PORT", "99999", "INFERENCE_HTTP_PORT"),
    ],
)
def test_invalid_setting_names_variable_and_accepted_values(monkeypatch, var, value, needle):
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert needle in str(err.value)
    assert "Accepted" in str(err.value)


def _documented_rows() -> list[list[str]]:
    """The rows of the settings table in docs/operations.md, each ``[variable, flag, default,
    meaning]`` with the backticks of the variable and flag stripped."""
    text = DOC.read_text(encoding="utf-8")
    block = text[text.index(gen_docs.BEGIN) + len(gen_docs.BEGIN) : text.index(gen_docs.END)]
    rows = []
    for line in block.strip().splitlines()[2:]:  # after the header and the |---| line
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ", 3)]
        cells[0], cells[1] = cells[0].strip("`"), cells[1].strip("`")
        rows.append(cells)
    return rows


def test_documented_table_lists_every_setting_once(monkeypatch):
    for name in list(os.environ):
        if name.startswith("INFERENCE_"):
            monkeypatch.delenv(name)
    rows = _documented_rows()
    names = list(Settings.model_fields)
    # Whole cells, in order: no setting missing, doubled or extra (a substring test would take
    # INFERENCE_MAX_IN_FLIGHT_BYTES for INFERENCE_MAX_IN_FLIGHT).
    assert [row[0] for row in rows] == [f"INFERENCE_{name.upper()}" for name in names]
    defaults = Settings()
    parser = argparse.ArgumentParser()
    add_cli_flags(parser)
    for name, (variable, flag, default, meaning) in zip(names, rows, strict=True):
        value = getattr(defaults, name)
        assert default == ("unset" if value is None else f"`{value}`"), variable
        assert overrides_from_args(parser.parse_args([flag, "x"])) == {name: "x"}, flag
        assert meaning == Settings.model_fields[name].description, variable


@pytest.mark.parametrize(
    ("value", "stored", "allowed"),
    [
        (None, None, frozenset()),  # unset: INFERENCE_S3_BUCKET alone
        ("", None, frozenset()),
        (" , ", None, frozenset()),
        ("cams-a", "cams-a", frozenset({"cams-a"})),
        (" cams-a, cams.b ,cams-a,, ", "cams-a,cams.b", frozenset({"cams-a", "cams.b"})),
        ("*", "*", None),
        (" * ", "*", None),
    ],
)
def test_allowed_buckets_parse(monkeypatch, value, stored, allowed):
    monkeypatch.delenv("INFERENCE_S3_ALLOWED_BUCKETS", raising=False)
    if value is not None:
        monkeypatch.setenv("INFERENCE_S3_ALLOWED_BUCKETS", value)
    s = load_settings()
    assert s.s3_allowed_buckets == stored
    assert s.allowed_buckets() == allowed


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("Cams", "'Cams' is not an S3 bucket name"),
        ("cams-a,x", "'x' is not an S3 bucket name"),
        ("s3://cams-a", "'s3://cams-a' is not an S3 bucket name"),
        ("cams-a,*", "'*' (any bucket) stands alone"),
    ],
)
def test_bad_allowed_buckets_name_the_variable_and_the_rule(monkeypatch, value, needle):
    monkeypatch.setenv("INFERENCE_S3_ALLOWED_BUCKETS", value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    message = str(err.value)
    assert "INFERENCE_S3_ALLOWED_BUCKETS" in message and needle in message, message
    assert "Accepted" in message

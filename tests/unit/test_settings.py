import pytest

from inference_service.errors import ConfigError
from inference_service.settings import Settings, load_settings, settings_table


def test_defaults_match_the_spec(monkeypatch):
    for name in list(__import__("os").environ):
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


def test_table_lists_every_setting():
    table = settings_table()
    for name in Settings.model_fields:
        assert f"INFERENCE_{name.upper()}" in table

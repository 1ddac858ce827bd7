"""Kafka security settings: what every client is configured with, and what start-up refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference_service.adapters.kafka import client_config
from inference_service.errors import ConfigError
from inference_service.settings import load_settings


def test_plaintext_by_default() -> None:
    conf = client_config(load_settings({"kafka_bootstrap_servers": "k1:9092,k2:9092"}))
    assert conf == {"bootstrap.servers": "k1:9092,k2:9092", "security.protocol": "PLAINTEXT"}


def test_sasl_ssl_carries_mechanism_credentials_and_ca() -> None:
    settings = load_settings(
        {
            "kafka_security_protocol": "SASL_SSL",
            "kafka_sasl_mechanism": "SCRAM-SHA-512",
            "kafka_sasl_username": "svc",
            "kafka_sasl_password": "s3cret",
            "kafka_ssl_ca_location": "/etc/kafka/ca.pem",
        }
    )
    conf = client_config(settings)
    assert conf["security.protocol"] == "SASL_SSL"
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert (conf["sasl.username"], conf["sasl.password"]) == ("svc", "s3cret")
    assert conf["ssl.ca.location"] == str(Path("/etc/kafka/ca.pem"))


def test_ssl_without_sasl_sends_no_credentials() -> None:
    conf = client_config(load_settings({"kafka_security_protocol": "SSL"}))
    assert conf["security.protocol"] == "SSL"
    assert not any(key.startswith("sasl.") for key in conf)


def test_sasl_without_credentials_stops_start_up_naming_the_settings() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_sasl_password": "x"})
    message = str(err.value)
    assert "INFERENCE_KAFKA_SASL_USERNAME" in message and "INFERENCE_KAFKA_SASL_PASSWORD" in message
    assert "'x'" not in message  # the password given is not echoed


def test_the_password_is_never_printed() -> None:
    settings = load_settings(
        {
            "kafka_security_protocol": "SASL_PLAINTEXT",
            "kafka_sasl_username": "svc",
            "kafka_sasl_password": "s3cret",
        }
    )
    assert "s3cret" not in json.dumps(settings.model_dump(mode="json"))
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings)


def test_an_unknown_protocol_is_refused() -> None:
    with pytest.raises(ConfigError, match="INFERENCE_KAFKA_SECURITY_PROTOCOL"):
        load_settings({"kafka_security_protocol": "TLS"})

"""Adapters from the ports to the outside world: S3, Kafka."""

"""Receive Luma Dream Machine callbacks over HTTP and write each as a keyed Kafka record."""

__version__ = "0.1.0"

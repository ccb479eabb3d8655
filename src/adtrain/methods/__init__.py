"""Anomaly detection methods: each a pure torch model plus a Lightning wrapper."""

"""Detectors: turn raw observations into typed anomalies. One kind per module."""

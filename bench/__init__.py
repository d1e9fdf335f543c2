"""Benchmarks of rollbackd: detection latency, evaluation capacity, footprint (see README.md)."""

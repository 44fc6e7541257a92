"""Benchmarks of disaggd: proxy overhead, recovery, the real engine on CPU (see README.md)."""

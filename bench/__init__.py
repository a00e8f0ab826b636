"""Benchmarks and acceptance measurements; each prints what it measured and writes JSON."""

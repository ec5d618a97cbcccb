"""Benchmarks of ratekit against its peers; run one with ``python -m bench.<name>``."""

"""Benchmarks: ``python -m psal.bench knn ...`` (see ``psal.bench.knn``)."""

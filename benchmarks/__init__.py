"""Benchmarks run by ``make bench``; figures go to ``benchmarks/results/`` (gitignored)."""

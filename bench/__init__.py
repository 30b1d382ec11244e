"""Benchmarks run from the repository root by `make bench-*` (not part of the installed package)."""

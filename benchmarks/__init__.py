"""selfage benchmark suite: ``python -m benchmarks --help``."""

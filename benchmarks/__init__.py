"""samsem performance benchmarks: ``python -m benchmarks --help``."""

"""Performance benchmarks run by `make perf` (one module per scorer)."""

"""tvr-bench: fair, fast, exact text-video retrieval benchmarking."""
__version__ = "0.1.0"

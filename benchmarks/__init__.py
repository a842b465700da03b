"""The benchmark scripts (run as files) and the finished investigations (run as modules from the repository root:
a package here, so that pysbd's own top-level `benchmarks` package does not shadow it)."""

"""Side-by-side measurements against the anchor libraries (run as ``python -m benchmarks.NAME``)."""

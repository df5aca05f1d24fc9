"""Benchmarks of the fleet through the real systemd harness (``make bench``)."""

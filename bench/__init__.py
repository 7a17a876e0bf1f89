"""Benchmarks of Ferry against the tools people use today (borg, restic, qemu-img), on a realistic image.

``python -m bench.run`` (``make bench``) runs one comparison and prints a table; ``bench/README.md`` explains
the figures and ``bench/RESULTS.md`` records them. Benchmarks never run as timed assertions in tests.
"""

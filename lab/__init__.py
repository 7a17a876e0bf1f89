"""The lab: a small oVirt 4.5 data center on one machine, for tests, benchmarks and the demo.

Used by tests, bench and the demo only; never by ``control`` or ``mover`` code paths.
"""

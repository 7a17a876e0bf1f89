"""Restore destinations: a file (zeros as holes), a block device; later imageio and SSH."""

"""Sources of block data: raw image files, block devices; later imageio and SSH.

``open_source(url)`` picks the backend by URL scheme (a plain path means ``file:``), as ovirt-imageio picks
its backends.
"""

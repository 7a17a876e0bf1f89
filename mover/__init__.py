"""Ferry movers: the job API, sources, sinks, the block pipeline and the content-addressed store.

Nothing here imports ``control`` or ``lab``.
"""

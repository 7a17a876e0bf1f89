"""The lab's engine: an oVirt REST API v4 server on the SDK's own types, readers and writers.

Modules: ``http`` (TLS server and routing), ``state`` (the model, persisted as JSON), ``sso`` (tokens),
``xml`` (SDK objects to and from XML), ``app`` (the engine: glue, background worker, backend calls), and one
module per group of collections (``system``, ``vms``, ``disks``, ``snapshots``, ``backups``, ``transfers``);
``phases`` holds the background stepping that ``snapshots`` and ``backups`` share.
"""

"""Ferry control plane: the engine client, flows per mode, the catalog and the CLI."""

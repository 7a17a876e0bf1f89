"""Backup and restore flows: explicit state machines with idempotent clean-up (see ``base.Flow``)."""

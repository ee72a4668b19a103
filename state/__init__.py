"""Stores with no Bytewax in them: hashing, embedding table, profiles, snapshots."""

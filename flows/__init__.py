"""Dataflows built from a config, the simulator, importers and the CLI."""

"""Bytewax operator logic: parsing, sources, sinks, joiner, trainers, serving."""

"""The bottom layer: the event model, event-log files and the seeded event simulator.

Imports nothing from ``flows``, ``operators``, ``models`` or ``state``; every other
package may import it (tests/test_layers.py checks the direction).
"""

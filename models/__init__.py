"""Learning code with no Bytewax in it: rankers, MF, calibration, metrics."""

"""Studies over many runs: the stability sweep (grid, classification, reports) and the plots."""

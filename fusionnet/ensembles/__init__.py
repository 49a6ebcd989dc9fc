"""Output ensembles of independently trained members: the methods table, voting, selection, stacking, calibration, boosting."""

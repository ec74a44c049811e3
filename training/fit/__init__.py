"""Fitting: the training regimes and the full run, evaluation, robustness, soup, ship, probe."""

"""Experiments reproducing the papers' comparisons on the synthetic task (results under ``results/``)."""

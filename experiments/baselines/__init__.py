"""Baseline models measured against Megalodon in the same benchmark run."""

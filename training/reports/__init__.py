"""Torch-free analysis: metrics, charts, EDA and run reports."""

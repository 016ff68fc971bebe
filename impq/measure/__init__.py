"""Measuring models: divergence from the full-precision reference (and, later, accuracy and speed)."""

"""Quantization: target grids (formats) and the algorithms that round weights onto them."""

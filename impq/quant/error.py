"""The output error of a weight change on the calibration inputs: tr(dW H dW^T) with H the inputs' mean x^T x,
which is the mean over tokens of ||x dW^T||^2, computed at the weight's size instead of the tokens'. Every
algorithm and measurement that scores a quantization by its effect on the layer's outputs uses it."""

from __future__ import annotations

import torch


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    # sum((dW H) * dW) is the trace without forming the [rows, rows] product
    return float(((delta @ hessian) * delta).sum())

"""Next-token agreement between two models' logits: KL divergence, top-1 agreement, largest logit difference
(the quantities llama.cpp's `llama-perplexity --kl-divergence` reports)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def kl_divergence(ref_logits: np.ndarray, test_logits: np.ndarray) -> float:
    """KL(P_ref || P_test) of the softmax distributions, in nats."""
    ref = ref_logits.astype(np.float64)
    test = test_logits.astype(np.float64)
    log_p = ref - ref.max() - np.log(np.exp(ref - ref.max()).sum())
    log_q = test - test.max() - np.log(np.exp(test - test.max()).sum())
    return float(np.sum(np.exp(log_p) * (log_p - log_q)))


# Reference logits closer than this to the reference's best are the same choice: a near-tie (seen at a margin of
# 1e-4 in a random test model) is flipped by any change in summation order, while a real error moves logits by
# far more (F16's tolerance is 0.05).
TIE_MARGIN = 1e-3


@dataclass
class Divergence:
    """Accumulates per-position comparisons."""
    klds: list[float] = field(default_factory=list)
    top1: list[bool] = field(default_factory=list)
    max_abs_diff: float = 0.0

    def add(self, ref_logits: np.ndarray, test_logits: np.ndarray) -> bool:
        self.klds.append(kl_divergence(ref_logits, test_logits))
        same = bool(ref_logits[int(np.argmax(test_logits))] >= ref_logits.max() - TIE_MARGIN)
        self.top1.append(same)
        self.max_abs_diff = max(self.max_abs_diff, float(np.max(np.abs(ref_logits - test_logits))))
        return same

    @property
    def mean_kld(self) -> float:
        return float(np.mean(self.klds)) if self.klds else 0.0

    @property
    def top1_agreement(self) -> float:
        return float(np.mean(self.top1)) if self.top1 else 0.0

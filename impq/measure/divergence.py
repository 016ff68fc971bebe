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


@dataclass
class Divergence:
    """Accumulates per-position comparisons. With `tie_margin`, a test argmax whose reference logit lies within
    that margin of the reference's best counts as agreeing (and is counted in `near_ties`): the default 0 compares
    argmaxes exactly, as llama-perplexity's "same top" does."""
    tie_margin: float = 0.0
    klds: list[float] = field(default_factory=list)
    top1: list[bool] = field(default_factory=list)
    near_ties: int = 0
    max_abs_diff: float = 0.0

    def add(self, ref_logits: np.ndarray, test_logits: np.ndarray) -> bool:
        self.klds.append(kl_divergence(ref_logits, test_logits))
        ref_best, test_best = int(np.argmax(ref_logits)), int(np.argmax(test_logits))
        same = ref_best == test_best
        if not same and ref_logits[test_best] >= ref_logits[ref_best] - self.tie_margin:
            same, self.near_ties = True, self.near_ties + 1
        self.top1.append(same)
        self.max_abs_diff = max(self.max_abs_diff, float(np.max(np.abs(ref_logits - test_logits))))
        return same

    @property
    def mean_kld(self) -> float:
        return float(np.mean(self.klds)) if self.klds else 0.0

    @property
    def top1_agreement(self) -> float:
        return float(np.mean(self.top1)) if self.top1 else 0.0

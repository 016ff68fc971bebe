"""Next-token agreement between two models' logits: KL divergence, top-1 agreement, largest logit difference
(the quantities llama.cpp's `llama-perplexity --kl-divergence` reports)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


def kl_terms(ref_log_probs: torch.Tensor, test_logits: torch.Tensor) -> torch.Tensor:
    """P_ref * (log P_ref - log P_test), elementwise: summed over the vocabulary, KL(P_ref || P_test) in nats.
    The one KLD formula of impq: the verification's and the sweep's per position, the sensitivity's summed."""
    return ref_log_probs.exp() * (ref_log_probs - torch.log_softmax(test_logits, -1))


def kl_divergence(ref_logits: np.ndarray, test_logits: np.ndarray) -> float:
    """KL(P_ref || P_test) of the softmax distributions of one position's logits, in nats (float64)."""
    ref = torch.from_numpy(np.asarray(ref_logits, dtype=np.float64))
    return float(kl_terms(torch.log_softmax(ref, -1), torch.from_numpy(np.asarray(test_logits, np.float64))).sum())


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

"""What calibration inputs tell the quantizers: each linear layer's X^T X (its Hessian, up to a factor), the
tokens it saw and, for AWQ, each input channel's summed |x|, gathered by hooks on a module's linear layers while
forward passes run. The layer loop (quant/driver.py) and the sensitivity measurement (measure/sensitivity.py)
both gather them here."""

from __future__ import annotations

import torch
from torch import nn


class InputsCaptured(Exception):
    """Raised by a hook once every linear layer has seen this pass's input (`stop_when_complete`): what the rest
    of the forward pass would compute is not needed."""


def gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X in float64 from float32 products (as in GPTQ; float64 matmuls are several times slower), with
    autocast off. A wide input's (1024 columns or more: SmolLM2's 1536-wide down_proj input too) is built from the
    blocks on and above the diagonal, mirrored: 10 of 16 column-block products, a third less work on the widest
    (Phi-2's 10240-wide fc2 input: 1.4 TFLOP per block at 8x1024 tokens), as BLAS's syrk would (torch has none)."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        width = x.shape[1]
        if width < 1024:
            return (x.T @ x).double()
        out = torch.empty(width, width, dtype=torch.float64, device=x.device)
        bounds = [width * i // 4 for i in range(5)]
        for i in range(4):
            rows = x[:, bounds[i]:bounds[i + 1]]
            for j in range(i, 4):
                block = (rows.T @ x[:, bounds[j]:bounds[j + 1]]).double()
                out[bounds[i]:bounds[i + 1], bounds[j]:bounds[j + 1]] = block
                if j > i:
                    out[bounds[j]:bounds[j + 1], bounds[i]:bounds[i + 1]] = block.T
        return out


class InputStatistics:
    """While open, every forward pass through `module` adds to each of its linear layers' X^T X sum (float64),
    token count and, with `abs_sums`, per-column sum of |x|. Linear layers fed the same tensor in a pass (q, k, v;
    Phi-2's fc1 beside the attention) share one product and form one group. Call `next_pass()` between forward
    passes; with `stop_when_complete`, the hook that completes a pass raises InputsCaptured."""

    def __init__(self, module: nn.Module, device: str | torch.device = "cpu", abs_sums: bool = False,
                 stop_when_complete: bool = False):
        self.linears = {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}
        self.hessians = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=device)
                         for name, m in self.linears.items()}
        self.counts = dict.fromkeys(self.linears, 0)
        self.abs_sums = {name: torch.zeros(m.in_features, dtype=torch.float64, device=device)
                         for name, m in self.linears.items()} if abs_sums else {}
        self.stop_when_complete = stop_when_complete
        self._first_reader: dict[str, str] = {}         # linear -> the first linear that read the same input
        self._this_pass: list[tuple[torch.Tensor, torch.Tensor, str]] = []   # (input, X^T X, its first reader)
        self._seen: set[str] = set()                     # the linear layers this pass has fed
        self._handles = []

    def __enter__(self) -> "InputStatistics":
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in self.linears.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self.next_pass()

    def next_pass(self) -> None:
        self._this_pass.clear()
        self._seen.clear()

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            shared = next((entry for entry in self._this_pass if entry[0] is args[0]), None)
            if shared is None:
                shared = (args[0], gram(x), name)
                self._this_pass.append(shared)      # holding the input keeps its identity unique in the pass
            self.hessians[name] += shared[1]
            self.counts[name] += x.shape[0]
            if name in self.abs_sums:
                self.abs_sums[name] += x.float().abs().sum(0).double()
            self._first_reader.setdefault(name, shared[2])
            self._seen.add(name)
            if self.stop_when_complete and len(self._seen) == len(self.linears):
                raise InputsCaptured
        return hook

    def groups(self) -> list[list[str]]:
        """The linear layers by the input they share, in the module's order; one the passes never reached has
        no statistics and is in no group."""
        groups: dict[str, list[str]] = {}
        for name in self.linears:
            if name in self._first_reader:
                groups.setdefault(self._first_reader[name], []).append(name)
        return list(groups.values())

    def mean_hessians(self) -> dict[str, torch.Tensor]:
        """X^T X / tokens, float32."""
        return {name: (h / max(1, self.counts[name])).float() for name, h in self.hessians.items()}

"""Perplexity on a held-out split.

The split's documents are joined with end-of-text tokens and cut into non-overlapping windows of the
model's context; each window's tokens are predicted from the window's earlier tokens. Past
``max_tokens`` the windows are spread evenly over the whole split, so the number stays representative.
"""

from __future__ import annotations

import math

import torch

from ..progress import NullReporter, Reporter


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, context: int, max_tokens: int = 32768, batch_size: int = 16,
               reporter: Reporter | None = None, label: str = "eval") -> float:
    reporter = reporter or NullReporter()
    n = ids.numel()
    if n < 2:
        raise ValueError("need at least two tokens to measure perplexity")
    width = min(context, n - 1)
    n_windows = max(1, (n - 1) // width)
    keep = max(1, min(n_windows, max_tokens // width))
    starts = torch.linspace(0, (n_windows - 1) * width, keep).round().long()
    starts = (starts // width) * width
    model.eval()
    nll, count = 0.0, 0
    with reporter.task(label, total=len(starts)) as task:
        for i in range(0, len(starts), batch_size):
            s = starts[i : i + batch_size]
            idx = s[:, None] + torch.arange(width + 1)[None, :]
            chunk = ids[idx]
            logits = model(input_ids=chunk[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(), chunk[:, 1:].reshape(-1), reduction="sum"
            )
            nll += loss.item()
            count += chunk[:, 1:].numel()
            task.advance(len(s))
    return math.exp(nll / count)

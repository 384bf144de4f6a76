"""Perplexity, and agreement with the float model (KL divergence, top-1), on token windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def _logits(model, window: torch.Tensor) -> torch.Tensor:
    return model(input_ids=window[None], use_cache=False).logits[0].float()


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, progress: bool = True, desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over every predicted position of every window."""
    nll, count = 0.0, 0
    for w in tqdm(windows, desc=desc, disable=not progress, leave=False):
        logits = _logits(model, w)
        nll += F.cross_entropy(logits[:-1], w[1:], reduction="sum").item()
        count += w.numel() - 1
    return math.exp(nll / count)


@torch.inference_mode()
def reference_logprobs(reference, windows: torch.Tensor, progress: bool = True) -> list[torch.Tensor]:
    """Log-probabilities of the reference on each window, to compare many models against."""
    return [F.log_softmax(_logits(reference, w), -1) for w in tqdm(windows, desc="reference", disable=not progress, leave=False)]


@torch.inference_mode()
def compare(model, reference, windows: torch.Tensor, progress: bool = True) -> dict:
    """PPL of `model`, and KL(reference || model) and top-1 agreement per token, averaged;
    and each window's mean NLL.

    `reference` is a model or its `reference_logprobs` on the same windows.
    """
    if isinstance(reference, torch.nn.Module):
        reference = reference_logprobs(reference, windows, progress=False)
    nll, kl, agree, count, window_nll = 0.0, 0.0, 0, 0, []
    for w, ref_logp in tqdm(list(zip(windows, reference)), desc="evaluate", disable=not progress, leave=False):
        logp = F.log_softmax(_logits(model, w), -1)
        window_nll.append(F.nll_loss(logp[:-1], w[1:], reduction="sum").item())
        nll += window_nll[-1]
        kl += F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()
        agree += (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()
        count += w.numel()
    return {
        "ppl": math.exp(nll / (count - windows.shape[0])),
        "kl": kl / count,
        "top1": agree / count,
        # per window, so that two models' PPL ratio gets a paired confidence interval
        "window_nll": [x / (windows.shape[1] - 1) for x in window_nll],
    }

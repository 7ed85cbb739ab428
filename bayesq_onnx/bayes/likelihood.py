"""The likelihood whose gradient gives one Fisher sample per calibration item: targets drawn from the model's
own predictive (true Fisher) or the given labels (empirical Fisher), with the random numbers of a batch drawn
once and handed out per micro-batch. Pure torch."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LIKELIHOODS = ("gaussian", "categorical")


class BatchDraws:
    """The random numbers of one calibration batch, drawn from its generator *for the whole batch* and in
    the order an unsplit run draws them (per target sample: the targets, then each layer's sketch test
    matrix), then handed out a micro-batch's rows at a time. The first micro-batch asks for them in that
    order; later ones reuse them."""

    def __init__(self, gen: torch.Generator, size: int):
        self.gen, self.size, self.drawn = gen, size, {}

    def get(self, key, draw: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
        if key not in self.drawn:
            self.drawn[key] = draw(self.gen)
        return self.drawn[key]


def pseudo_loss(out: torch.Tensor, likelihood: str, fisher: str, target, draws: BatchDraws, sample: int,
                 rows: slice) -> torch.Tensor:
    """Sum over items of the log-likelihood whose gradient is one Fisher sample per item (``out``: the
    micro-batch ``rows`` of the batch; ``target``: its labels)."""
    out = out.float()
    n = draws.size
    if likelihood == "categorical":
        logits = out.reshape(-1, out.shape[-1])
        if fisher == "empirical":
            y = target.reshape(-1).long()
        else:
            # y ~ softmax(logits) as torch.multinomial(p, 1) draws it: argmax(p / q), q ~ Exp(1) i.i.d. for
            # every (row, class) of the whole batch; q does not depend on p, so it is drawn once per batch
            per_item = logits.shape[0] // out.shape[0]
            q = draws.get(("target", sample), lambda g: torch.empty(n * per_item, logits.shape[1]).exponential_(1, generator=g))
            y = (torch.softmax(logits.detach(), dim=-1) / q[rows.start * per_item:rows.stop * per_item]).argmax(-1)
        return F.cross_entropy(logits, y, reduction="sum")
    if fisher == "empirical":
        return 0.5 * ((out - target.float()) ** 2).sum()
    eps = draws.get(("target", sample), lambda g: torch.randn((n, *out.shape[1:]), generator=g))[rows]
    return (out * eps).sum()

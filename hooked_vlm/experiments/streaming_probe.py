"""Linear softmax probes trained as activations stream past, one batch of images at a time.

The paper's position probes (PAPER_PROTOCOL §1.7) read every layer of the model on 50,000
images: keeping the features would take terabytes (LLaVA-7B: 158,720 floats per image token,
PROTOCOL-AUDIT A6). So nothing is kept but what the probes need: running moments to standardise
each site's features (`RunningMoments`), and each site's probe (`SiteProbe`) with its Adam state,
updated on the minibatches of each batch of images as it arrives; scoring keeps counts only.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

MINIBATCH = 256  # tokens per Adam step


class RunningMoments:
    """Mean and standard deviation of features seen in several batches (float64 sums)."""

    def __init__(self) -> None:
        self.n, self.sum, self.sum_sq = 0, None, None

    def update(self, x: Float[Tensor, "n d"]) -> None:
        x = x.double()
        self.n += x.shape[0]
        self.sum = x.sum(0) if self.sum is None else self.sum + x.sum(0)
        self.sum_sq = (x * x).sum(0) if self.sum_sq is None else self.sum_sq + (x * x).sum(0)

    def mean_std(self) -> tuple[Tensor, Tensor]:
        if self.n < 2:
            raise ValueError("need at least two tokens to standardise a probe's features")
        mean = self.sum / self.n
        variance = (self.sum_sq - self.n * mean * mean).clamp(min=0) / (self.n - 1)
        return mean.float(), variance.sqrt().float().clamp(min=1e-6)


class SiteProbe:
    """The row and column probes of one site: one linear layer whose outputs are the row classes
    then the column classes, trained on the sum of the two cross-entropies. The two halves share
    no parameter and Adam is per parameter, so this trains exactly two independent probes, with
    half the steps. Initialised as `nn.Linear` is, from `generator` (the result then depends on
    the seed only)."""

    def __init__(self, moments: RunningMoments, n_rows: int, n_cols: int, lr: float, generator: torch.Generator, device):
        self.mean, self.std = (t.to(device) for t in moments.mean_std())
        self.n_rows, self.n_cols = n_rows, n_cols
        d = self.mean.shape[0]
        bound = d**-0.5
        weight = torch.empty(n_rows + n_cols, d).uniform_(-bound, bound, generator=generator)
        bias = torch.empty(n_rows + n_cols).uniform_(-bound, bound, generator=generator)
        self.linear = torch.nn.utils.skip_init(torch.nn.Linear, d, n_rows + n_cols, device=device)  # no global draw
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)
        self.optimizer = torch.optim.Adam(self.linear.parameters(), lr=lr)

    def logits(self, x: Float[Tensor, "n d"]) -> tuple[Float[Tensor, "n n_rows"], Float[Tensor, "n n_cols"]]:
        out = self.linear((x.to(self.mean.device).float() - self.mean) / self.std)
        return out[:, : self.n_rows], out[:, self.n_rows :]

    def train_on(self, x: Float[Tensor, "n d"], y: Int[Tensor, "n 2"], generator: torch.Generator) -> None:
        """Adam steps on `x` in shuffled minibatches."""
        y = y.to(self.mean.device)
        with torch.enable_grad():
            for index in torch.randperm(len(y), generator=generator).split(MINIBATCH):
                index = index.to(self.mean.device)
                rows, cols = self.logits(x[index.to(x.device)])
                loss = torch.nn.functional.cross_entropy(rows, y[index, 0]) + torch.nn.functional.cross_entropy(cols, y[index, 1])
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()

    @torch.no_grad()
    def n_correct(self, x: Float[Tensor, "n d"], y: Int[Tensor, "n 2"]) -> tuple[int, int]:
        rows, cols = self.logits(x)
        y = y.to(rows.device)
        return int((rows.argmax(-1) == y[:, 0]).sum()), int((cols.argmax(-1) == y[:, 1]).sum())

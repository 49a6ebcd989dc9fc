"""Greedy soups (Wortsman et al., ICML 2022): the weights of a run's best epochs averaged, one epoch at a time in
order of validation score, each kept only if the average validates at least as well (``TrainConfig.soup``: how
many best epochs are candidates; 0, the default, is off: no measurement here has shown it helps yet).

:class:`SoupPool` keeps the ``k`` best epochs' weights (on the CPU) as training goes; :meth:`SoupPool.cook` makes
the soup once training ends and leaves it in the model. Floating-point buffers (BatchNorm's running statistics)
are averaged with the weights; integer ones (``num_batches_tracked``) are the best epoch's.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class SoupPool:
    def __init__(self, k: int, higher_is_better: bool) -> None:
        self.k, self.higher = k, higher_is_better
        self.pool: list[tuple[float, int, dict[str, torch.Tensor]]] = []  # (score, epoch, state dict), best first

    def offer(self, score: float, epoch: int, module: nn.Module) -> None:
        """Keep this epoch's weights if they are among the ``k`` best so far."""
        if len(self.pool) == self.k and not self._better(score, self.pool[-1][0]):
            return
        state = {n: t.detach().to("cpu", copy=True) for n, t in module.state_dict().items()}
        self.pool.append((score, epoch, state))
        self.pool.sort(key=lambda e: -e[0] if self.higher else e[0])
        del self.pool[self.k:]

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.higher else a < b

    def cook(self, module: nn.Module, validate: Callable[[], float]) -> tuple[list[int], float] | None:
        """The greedy soup into ``module``: (its epochs, its validation score), or None with fewer than two
        candidates. ``validate()`` scores ``module`` as it is."""
        if len(self.pool) < 2:
            return None
        best_score, best_epoch, best_state = self.pool[0]
        ingredients, score = [best_state], best_score
        epochs = [best_epoch]
        for cand_score, epoch, state in self.pool[1:]:
            module.load_state_dict(average([*ingredients, state]))
            trial = validate()
            if trial == score or self._better(trial, score):
                ingredients.append(state)
                epochs.append(epoch)
                score = trial
        module.load_state_dict(average(ingredients))
        return epochs, score


def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average of state dicts (floating tensors; others from the first)."""
    out = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            out[name] = torch.stack([s[name].double() for s in states]).mean(0).to(first.dtype)
        else:
            out[name] = first.clone()
    return out

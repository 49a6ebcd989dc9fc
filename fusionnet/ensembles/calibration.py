"""Temperature scaling (Guo et al., 2017) of one member, an ensemble or a FusionNet, fitted on validation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fusionnet.utils.probabilities import EPS, check_probs, scale_probs  # noqa: F401  (scale_probs: re-exported)
from fusionnet.utils.metrics import expected_calibration_error, nll


@dataclass
class Temperature:
    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float

    def apply(self, probs: torch.Tensor) -> torch.Tensor:
        return scale_probs(probs, self.temperature)


def fit_temperature(probs: torch.Tensor, labels: torch.Tensor) -> Temperature:
    """The T > 0 minimising validation NLL of softmax(log p / T) (Guo et al., 2017), with ECE before and after."""
    probs, labels = check_probs(probs, labels)
    logp = probs.double().clamp_min(EPS).log()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logp / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    after = scale_probs(probs, t)
    return Temperature(t, nll(probs, labels), nll(after, labels), expected_calibration_error(probs, labels),
                       expected_calibration_error(after, labels))


def scaled_nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """NLL after temperature scaling fitted on the same split: a score of how well the probabilities rank the
    classes, whatever their confidence (label smoothing, for one, leaves a model under-confident on purpose).
    In-sample by one parameter, so slightly optimistic, by about as much for every model. (A temperature fitted on
    one half and scored on the other was tried and is unstable near 100 % accuracy: a half with no error fits
    T -> 0 and the other half's one error then costs tens of nats.)"""
    return fit_temperature(probs, labels).nll_after

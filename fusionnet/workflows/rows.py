"""Stable ids of a report's rows, and the labels reports print for them (the only place labels are made).

Code keys rows by these ids (``results.json``'s ``methods``, the seed summary, ``fuse.json``); a label such as
"FusionNet (selected on val)" is display text that may change.

* a member: ``member:<name>``; an output-ensemble method: its registered id (``soft``, ``greedy``, ...);
* a fusion model: ``fusion:<variant>`` (``fusion:late_oof``, ``fusion:from_members``: ``fuse`` writes these
  too), and the soft vote of a late-fusion model's own branch classifiers ``fusion:<variant>:branch_vote``;
* the rows chosen on validation: ``selected:fusion``, ``selected:fusion:scaled``, ``selected:ensemble``.
"""

from __future__ import annotations

SELECTED_FUSION = "selected:fusion"
SELECTED_FUSION_SCALED = "selected:fusion:scaled"
SELECTED_ENSEMBLE = "selected:ensemble"
_SELECTED_LABELS = {SELECTED_FUSION: "FusionNet (selected on val)",
                    SELECTED_FUSION_SCALED: "FusionNet (selected on val), temperature-scaled",
                    SELECTED_ENSEMBLE: "ensemble (selected on val)"}


# Row ids renamed in fusionnet 0.4 (one name per idea): old results.json / fuse.json files are read through these
RENAMED = {"fusion:stacked": "fusion:late_oof", "fusion:stacked:branch_vote": "fusion:late_oof:branch_vote",
           "fusion:fused_members": "fusion:from_members", "stacking-hgb": "stacking_hgb"}


def current_id(row_id: str) -> str:
    """``row_id`` as this version names it (an id of an older results.json mapped to its new name)."""
    return RENAMED.get(row_id, row_id)


def member_id(name: str) -> str:
    return f"member:{name}"


def fusion_id(variant: str) -> str:
    return f"fusion:{variant}"


def branch_vote_id(variant: str) -> str:
    return f"fusion:{variant}:branch_vote"


_VARIANT_LABELS = {"late_oof": "late, out-of-fold fit"}


def fusion_label(variant: str) -> str:
    return f"FusionNet ({_VARIANT_LABELS.get(variant, variant.replace('_', ' '))})"


def label(row_id: str) -> str:
    """What a report prints for the row ``row_id``."""
    row_id = current_id(row_id)
    if row_id in _SELECTED_LABELS:
        return _SELECTED_LABELS[row_id]
    kind, _, rest = row_id.partition(":")
    if kind == "member":
        return f"member: {rest}"
    if kind == "fusion":
        variant, _, part = rest.partition(":")
        return fusion_label(variant) + (": its branch classifiers' soft vote" if part == "branch_vote" else "")
    from fusionnet.ensembles.methods import ENSEMBLES  # here, not above: runs.py needs this module without torch

    return ENSEMBLES.get(row_id).label if row_id in ENSEMBLES else row_id

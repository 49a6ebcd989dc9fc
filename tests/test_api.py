"""The public API: a small, pinned set of top-level names, each documented, with explicit keyword signatures."""

import inspect

import fusionnet

PUBLIC = {
    # build, fuse, train, predict, evaluate, compare, auto
    "FusionNet", "create_fusionnet", "fuse_members", "fit", "FitResult", "Callback", "predict", "evaluate",
    "load_splits", "compare", "auto", "VotingEnsemble", "MemberOutputs", "Vote",
    # one load / save pair
    "load", "save",
    # list_* and register_* for every extension kind
    "list_backbones", "register_backbone", "list_fusions", "register_fusion", "list_ensembles", "register_ensemble",
    "list_variants", "register_variant", "list_callbacks", "register_callback",
    # the settings those take
    "FusionConfig", "BranchConfig", "TrainConfig", "CompareConfig", "AutoConfig", "PlainConfig",
    # the errors
    "FusionNetError", "ConfigError", "DataError", "MissingFileError", "CheckpointMismatchError", "TrainingError",
    "WeightsUnavailableError", "WriteError",
}


def test_the_top_level_names_are_pinned_and_each_is_documented():
    assert set(fusionnet.__all__) == PUBLIC
    undocumented = [n for n in PUBLIC if not (inspect.getdoc(getattr(fusionnet, n)) or "").strip()]
    assert undocumented == []


def test_public_functions_take_explicit_keywords_not_kwargs_for_a_dataclass():
    """An editor, help() and an API reference show every setting: no **kwargs passed on to a dataclass."""
    for name in ("FusionNet", "create_fusionnet", "fuse_members", "load_splits", "predict", "evaluate", "fit",
                 "compare", "auto", "load", "save"):
        target = getattr(fusionnet, name)
        params = inspect.signature(target.__init__ if inspect.isclass(target) else target).parameters.values()
        assert not [p.name for p in params if p.kind is p.VAR_KEYWORD], name


def test_every_registry_lists_what_it_registers():
    assert {"resnet18", "efficientnet_lite0", "googlenet"} <= set(fusionnet.list_backbones())
    assert fusionnet.list_fusions()[:4] == ["concat", "gated", "attention", "late"]
    assert {"soft", "stacking", "stacking_hgb"} <= set(fusionnet.list_ensembles())
    assert {"concat", "late", "late_oof", "from_members"} <= set(fusionnet.list_variants())
    assert "ema" in fusionnet.list_callbacks()

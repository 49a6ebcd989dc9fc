"""Every setting of the library as small typed dataclasses: the one place their defaults, checks and help live.

The ``fusionnet`` command derives its flags from these fields (:func:`fusionnet.cli.args.add_fields`), a
``--config FILE`` holds the same keys, and every run folder saves the config it ran with, so a flag, a config-file
key and a saved setting are one field (:mod:`.train`, :mod:`.commands`). This package imports no torch: ``fusionnet X --help`` stays fast.

* :class:`TrainConfig`: optimisation, freezing, loss, schedule, training tricks and run settings of one ``fit``.
* :class:`TrainRun`: what ``fusionnet train`` adds: data, backbones, fusion method, output folder.
* :class:`CompareConfig`: the fusion-vs-voting experiment; it holds a TrainConfig that every model trains with.
* :class:`PlainConfig`: how plain state-dict members were trained (classes, size, resize, crop, mean/std).
* :class:`Reading`: how a model reads an image (reader, size, resize mode, crop).
* :class:`FuseConfig`: ``fusionnet fuse``: the user's members, the fused heads, and a TrainConfig for them.
* :class:`AutoConfig`: ``fusionnet auto``: candidates, time limit, selection settings.
* :class:`DistillConfig`: ``fusionnet distill``: a teacher, a student backbone, the data, and a TrainConfig.
"""

from fusionnet.config.commands import (HEADS, AutoConfig, CompareConfig, DistillConfig, FuseConfig,  # noqa: F401
                                       PlainConfig, distill_train_config, fuse_train_config, parse_duration)
from fusionnet.config.reading import CANDIDATE_SIZES, READERS, RESIZES, Reading, resize_target  # noqa: F401
from fusionnet.config.train import (DEFAULT_FUSION, MONITORS, REGIMES, SELECT_BY, STRATEGIES, TRACKERS,  # noqa: F401
                                    TrainConfig, TrainRun, check_installed, hyperrule_epochs, regime_train_config,
                                    resolved, setting)

"""Models: the interface, backbones, pooling, branches, fusion methods, FusionNet, checkpoints, the factory, ONNX export. Never imports data or engine."""

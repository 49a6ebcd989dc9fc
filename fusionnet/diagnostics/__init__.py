"""Diagnostics of a trained model, apart from the workflows that train and compare: what each branch of a
FusionNet contributes (:mod:`.branches`: ablation, linear probes, CKA, t-SNE, Grad-CAM), used by the notebooks."""

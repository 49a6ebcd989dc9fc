"""Helpers every layer may use: atomic files and paths, image decoding, devices and torchrun, metrics, plots."""

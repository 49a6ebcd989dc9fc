"""Data: the dataset protocol and image datasets, splits, transforms, caches of decoded images, input paths, TTA."""

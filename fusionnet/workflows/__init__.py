"""Workflows: the pipeline of entries, compare, cross-fitting, fuse, distill, reports, the demo, the gap check, diagnostics."""

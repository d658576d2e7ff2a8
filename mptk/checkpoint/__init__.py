"""Checkpoints: file format, rank state, and the resume choice."""

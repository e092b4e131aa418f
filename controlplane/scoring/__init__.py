"""Weights per backend: from configured weights today; from telemetry as strategies grow."""

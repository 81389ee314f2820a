"""Evaluation tasks: offline, seeded generators plus string-matching scorers."""

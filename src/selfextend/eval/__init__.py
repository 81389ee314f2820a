"""The offline evaluation harness: tasks, the resumable runner, results files, reports and the G x W sweep.

* ``tasks/``: seeded prompt generators and scorers (``TASKS``);
* ``runner.py``: methods x lengths x depths x samples on one model, one JSONL row per sample;
* ``results.py``: reading and writing those rows (torn lines skipped, resumable);
* ``report.py``: tables, JSON summaries and plots from the rows, never from a model;
* ``tune.py``: the sweep behind ``selfextend tune`` (the winner is saved by ``tuned.py``).
"""

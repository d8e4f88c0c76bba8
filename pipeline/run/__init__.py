"""Orchestration: a recipe's run, the one-stage runs behind the standalone commands, phase two
(engines on a GPU host), the stage cache and the release lock."""

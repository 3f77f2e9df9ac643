"""Composer adapters: the model wrapper, per-group signals and the mixing ``Algorithm`` classes.

Importing anything here imports Composer and torch; the pure update rules live in
:mod:`mixstream.algorithms` and import neither.
"""

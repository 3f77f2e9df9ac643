"""Composer adapters: the model wrapper and the mixing ``Algorithm`` classes, which feed
Composer's events into the framework-free mixers of :mod:`mixstream.mixing`.

Importing anything here imports Composer and torch; the pure update rules live in
:mod:`mixstream.algorithms` and import neither.
"""

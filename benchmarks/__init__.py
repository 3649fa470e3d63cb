"""Benchmarks: scripts that print one JSON line of figures each (``python -m benchmarks.NAME``).

They measure speed and memory; they never fail CI on a speed figure.
"""

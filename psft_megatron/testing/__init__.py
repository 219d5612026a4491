"""Helpers for tests and benchmarks: N real gloo processes with a hard timeout, the tiny recipe.

Nothing in the package imports this; it may import anything.
"""

"""Typed YAML -> dataclasses: parsing, ``key.sub=value`` overrides, errors with file and line.

Belongs here: the generic loader machinery (``load.py``) and its error types. Not here:
any section's dataclass (each lives next to its component, e.g. ``model.config``) or the
recipe that composes them (``psft_megatron.recipe``). Imports nothing of the project.
"""

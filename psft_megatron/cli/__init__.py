"""The command-line entry points: one small module per command, all run in ``shell.py``.

Belongs here: each command's argument parsing and the few lines that call the library
(``psft-train`` = ``train.py``, ``psft-plan`` = ``plan.py``, ``psft-convert-hf`` = ``convert_hf.py``,
``psft-export-hf`` = ``export_hf.py``, ``psft-convert-gguf`` = ``convert_gguf.py``,
``psft-prepare-data`` = ``prepare_data.py``, ``psft-evaluate`` = ``evaluate.py`` (its held-out
NLL mode: ``evaluate_nll.py``), ``psft-compare`` = ``compare.py``, and ``make_tiny_dataset.py``);
``shell.py`` owns logging, the warning filters and the exit statuses. ``launch/`` and ``tools/``
hold thin wrappers that call these by path. Not here: anything a library caller would want.

The top layer: a command may import any layer below. Its imports of the library sit inside
functions, so ``--help`` and the torch-free input checks answer before megatron-core (seconds
of imports) is loaded; ``tests/test_layering.py`` still checks their direction.
"""

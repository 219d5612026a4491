"""psft-megatron: Proximal Supervised Fine-Tuning on Megatron-Core.

Layers, lowest first (imports only flow down; ``tests/test_layering.py`` enforces it):
``config`` -> ``runtime`` | ``loss`` | ``data`` -> ``model`` -> ``checkpoint`` ->
``conversion`` -> ``evaluation`` -> ``training`` -> ``recipe`` -> ``run``; ``testing`` sits
beside the top for tests and benchmarks. Entry points: :func:`psft_megatron.run.run` and
:func:`psft_megatron.recipe.load_recipe`.
"""

"""The training loop and the components it orchestrates.

Belongs here: the ``training`` / ``optimizer`` / ``logging`` recipe sections, megatron's
DDP + optimizer + LR schedule, the snapshot / train / eval passes over megatron's pipeline
schedule, the phase schedule, evaluator, stop policy, metrics and the loop itself. Not here:
building a run from a recipe (``psft_megatron.run``) or the loss maths (``loss``).
"""

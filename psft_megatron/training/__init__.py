"""The training loop and the components it orchestrates.

Belongs here: the ``training`` / ``optimizer`` / ``logging`` recipe sections, megatron's
DDP + optimizer + LR schedule, the snapshot / train / eval passes (on the model's forward
engine, ``psft_megatron.model.forward``), the phase schedule, evaluator, stop policy, metrics
and the loop itself; each component builds from its own recipe section (``from_config``). Not
here: building a run from a recipe (``psft_megatron.run``) or the loss maths (``loss``).
"""

"""Weights and training state on disk, loadable at any TP/PP layout.

Belongs here: the ``checkpoint`` recipe section, the model-checkpoint directory shared by
the converters, trainer and evaluation, training checkpoints (optimizer, schedule, RNG,
registered states) and the :class:`~psft_megatron.checkpoint.checkpointer.Checkpointer`
that decides when to save. Not here: HF formats (``conversion``) or the training loop.
"""

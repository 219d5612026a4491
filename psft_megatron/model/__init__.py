"""The model: the ``model`` recipe section, HF config reading, and megatron GPTModel chunks.

Belongs here: ``ModelConfig``, building megatron-core ``GPTModel`` chunks for a layout (TE or
local spec), the HF ``config.json`` reader/writer, and the one forward engine over megatron's
pipeline schedule (``forward``: every training and scoring pass runs through it).
Not here: weights on disk (``checkpoint``), HF weight mapping (``conversion``), losses (``loss``).
"""

"""The model: the ``model`` recipe section, the model families, and megatron GPTModel chunks.

Belongs here: ``ModelConfig``, the registry of model families (``architectures``: one module
per family with its HF config mapping, weight-mapping table, own transforms and model types),
the HF ``config.json`` reader/writer, building megatron-core ``GPTModel`` chunks for a layout
(TE or local spec), and the one forward engine over megatron's pipeline schedule (``forward``:
every training and scoring pass runs through it).
Not here: weights on disk (``checkpoint``), moving tensors between HF and Megatron files
(``conversion``, which reads the families' tables), losses (``loss``).
"""

"""HF <-> Megatron checkpoint conversion through a declarative weight-mapping registry, streamed.

Belongs here: the mapping registry and transforms, safetensors I/O, the two converters,
their torch-free up-front checks (``checks``) and ``ConversionError`` (``errors``).
Not here: the checkpoint directory format itself (``checkpoint``) or training.
"""

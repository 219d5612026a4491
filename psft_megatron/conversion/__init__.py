"""HF <-> Megatron checkpoint conversion, streamed tensor by tensor, from the families' weight tables.

Belongs here: expanding a family's weight table for one model and resolving its transforms
(``registry``), the generic transforms (``transforms``: QKV interleave, gate/up, vocabulary
padding), safetensors I/O, the two converters, their torch-free up-front checks (``checks``)
and ``ConversionError`` (``errors``).
Not here: what a family is (its config mapping, weight table, own transforms and model types:
``psft_megatron.model.architectures``), the checkpoint directory format (``checkpoint``), training.
"""

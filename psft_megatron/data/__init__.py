"""Chat SFT data: sources -> adapters -> tokenizer/templates -> encode -> cache -> packing -> loader.

Belongs here: the ``data`` recipe section, reading files and hub datasets, chat templates,
tokenisation with loss masks, the mmap token cache, packing and the resumable DP-sharded
loader, batch geometry (``loader.check_batch_sizes``). Not here: models or training passes.
"""

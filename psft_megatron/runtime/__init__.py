"""The process and device layer: torch.distributed and megatron's parallel state, and CPU support.

Belongs here: the ``parallel`` / ``distributed`` recipe sections, process-group set-up and
teardown, seeding, and ``cpu_compat`` (megatron-core's CUDA assumptions routed to the CPU,
applied only without CUDA). Not here: anything about models, data or training.
"""

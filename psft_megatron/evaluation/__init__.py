"""Evaluation of model checkpoints: lm-evaluation-harness tasks, held-out NLL/entropy, KL drift.

Belongs here: loading a checkpoint for scoring at any TP/PP/DP (``session``), the rank-0
driver / worker protocol (``driver``), the Megatron log-likelihood backend (``scoring``),
the ``lm_eval`` model class (``lm_eval_model``, registered as ``psft_megatron``), generation
on an exported copy (``generation``), the task templates and their data loaders (``tasks``),
math answer checking (``math_answers``), held-out NLL and entropy (``heldout``), KL drift
against a reference checkpoint (``drift``), running lm-eval and writing its files
(``harness``), result tables (``report``) and the in-training hook (``in_training``).

Not here: the metrics themselves where a lower layer owns them (vocab-parallel log-probs,
entropy, KL and argmax live in ``loss``), checkpoint formats (``checkpoint``), the exporter
(``conversion``), and the training loop that calls the in-training hook (``training``).

lm-eval and math-verify are the optional ``eval`` extra: only ``lm_eval_model``, ``harness``,
``math_answers`` and ``tasks.utils`` import them, so the rest (and training without
``training.eval_tasks``) works without it.
"""

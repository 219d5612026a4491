"""Evaluation of model checkpoints: lm-evaluation-harness tasks, held-out NLL/entropy, KL drift.

Belongs here: loading a checkpoint for scoring at any TP/PP/DP (``session``), the rank-0
driver / worker protocol (``driver``), the Megatron log-likelihood backend (``scoring``),
the ``lm_eval`` model class (``lm_eval_model``, registered as ``psft_megatron``), generation
on an exported copy (``generation``), the task templates and their data loaders (``tasks``),
math answer checking (``math_answers``), held-out NLL and entropy (``heldout``), KL drift
against a reference checkpoint (``drift``), running lm-eval and writing its files
(``harness``), one whole evaluation (``options``: the job and its torch-free input checks,
``inputs``, ``job``: the run), result tables (``report``) and several runs compared
(``compare``).

Not here: the metrics themselves where a lower layer owns them (vocab-parallel log-probs,
entropy, KL and argmax live in ``loss``), checkpoint formats (``checkpoint``), the exporter
(``conversion``), and the training loop (``training``).

lm-eval and math-verify are the optional ``eval`` extra (matplotlib too, for ``compare``): only
``lm_eval_model``, ``harness``, ``job``, ``math_answers`` and ``tasks.utils`` import them; nothing
outside this package imports those modules, so training works without the extra.
"""

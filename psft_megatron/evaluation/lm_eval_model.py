"""The ``lm_eval`` model class for psft checkpoints: ``@register_model("psft_megatron")``.

lm-eval sees one process (global rank 0 of the job, ``rank 0 / world_size 1``). Everything
lm-eval-specific lives here: tokenising request pairs exactly as lm-eval's ``hf`` backend
(HFLM) does (``TemplateLM._encode_pair``: trailing whitespace of the context moves into the
continuation; the whole string is tokenised and split), batching, rolling windows, the chat
template and stop sequences. The model sits behind two small backends:

* a *scorer* (``score(rows) -> per row, per target (sum logp, greedy)``; rows as in
  :mod:`.scoring`): :class:`~psft_megatron.evaluation.scoring.MegatronScorer` over the
  driver, so multiple-choice and perplexity tasks run on the sharded checkpoint;
* a *generator* (``generate(prompts, ...) -> new token ids``): transformers or vLLM on an
  exported copy (:mod:`.generation`).

Chat template: the one the model was trained with (a project :class:`ChatTemplate`: the
recipe's ``data.chat_template`` or the tokenizer's own). Training templates render whole
conversations with the character spans of trained turns, so a generation prompt is the
messages plus a placeholder assistant turn, cut where that turn's span starts (for the
tokenizer's Jinja template this is exactly ``apply_chat_template(add_generation_prompt=True)``).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol, Sequence

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from psft_megatron.data.templates import ChatTemplate
from psft_megatron.data.tokenizer import Tokenizer
from psft_megatron.data.types import Conversation, Message, Provenance
from psft_megatron.evaluation.scoring import Row

log = logging.getLogger(__name__)

__all__ = ["Generator", "PSFTMegatronLM", "Scorer", "render_prompt"]

_PLACEHOLDER = "x"  # content of the stand-in assistant turn whose span start ends the prompt


class Scorer(Protocol):
    def score(self, rows: Sequence[Row]) -> list[list[tuple[float, bool]]]: ...


class Generator(Protocol):
    def generate(self, prompts: Sequence[list[int]], *, max_new_tokens: int, do_sample: bool, temperature: float,
                 top_p: float, stop: Sequence[str]) -> list[list[int]]: ...


def render_prompt(template: ChatTemplate, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The text the model continues: ``messages`` rendered with the training template.

    ``add_generation_prompt``: end with the assistant header, ready for a new answer; False: the last
    message is an assistant turn to continue (lm-eval's ``gen_prefix``), cut right after its content.
    """
    msgs = [Message(m["role"], m["content"]) for m in messages]  # type: ignore[arg-type]
    if add_generation_prompt:
        msgs.append(Message("assistant", _PLACEHOLDER, train=True))
        prefix = ""
    else:
        if not msgs or msgs[-1].role != "assistant":
            raise ValueError("add_generation_prompt=False continues an assistant turn: the last message must be one")
        prefix = msgs[-1].content
        msgs[-1] = Message("assistant", prefix, train=True)
    rendered = template.render(Conversation(tuple(msgs), Provenance("lm-eval request", 0)))
    start = rendered.spans[-1].start
    if not add_generation_prompt:
        return rendered.text[: rendered.text.index(prefix, start) + len(prefix)]
    return rendered.text[:start]


def _adds_bos_by_default(tokenizer: Any) -> bool:
    """Whether the HF tokenizer behind HFLM would prepend BOS to plain text (its post-processor does:
    Llama-3, Llama-2's SentencePiece), so ``tok_encode`` matches HFLM's ids. SmolLM2, Qwen: no."""
    if tokenizer.bos_id is None:
        return False
    tk = getattr(tokenizer, "tk", None)  # HFTokenizer: the tokenizers.Tokenizer with its post-processor
    if tk is not None:
        return tk.encode("a", add_special_tokens=True).ids[:1] == [tokenizer.bos_id]
    return hasattr(tokenizer, "sp")  # SentencePiece: Llama-2 tokenizers add BOS by default


@register_model("psft_megatron")
class PSFTMegatronLM(TemplateLM):
    """lm-eval model over a scorer (log-likelihoods) and an optional generator, with the project's
    tokenizer and training chat template."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        scorer: Scorer | None = None,
        generator: Generator | None = None,
        *,
        template: ChatTemplate | None = None,
        batch_size: int = 8,
        max_length: int = 4096,
        max_gen_toks: int = 256,
        name: str = "psft_megatron",
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.scorer = scorer
        self.generator = generator
        self.template = template
        self.batch_size = batch_size
        self._max_length = max_length
        self._max_gen_toks = max_gen_toks
        self._name = name
        self._add_bos = _adds_bos_by_default(tokenizer)
        self._special_ids = set(tokenizer.special_tokens.values())

    # ------------------------------------------------------------ what TemplateLM needs
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        # As HFLM: BOS if the tokenizer has one, else EOS (an empty context; rolling windows).
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        # Keys lm-eval's request cache together with the template.
        return f"{self._name}-{self.tokenizer.fingerprint()}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids as HFLM gets them: the tokenizer's default BOS unless the text starts with it."""
        ids = self.tokenizer.encode(string)
        add = add_special_tokens
        if add is None:
            bos = self.tokenizer.bos_token
            add = self._add_bos and not (bos and string.startswith(bos))
        if add and self._add_bos:
            ids = [self.tokenizer.bos_id] + ids
        return ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        """Text of generated ids, special tokens left out (HFLM: ``skip_special_tokens=True``)."""
        return self.tokenizer.decode([i for i in ids if i not in self._special_ids])

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if self.template is None:
            raise ValueError("no chat template: build the model with template=... (the training template)")
        return render_prompt(self.template, chat_history, add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """What lm-eval logs as the chat template: the training template's source or name."""
        if not chat_template or self.template is None:
            return None
        return getattr(self.template, "source", None) or self.template.fingerprint()

    # ------------------------------------------------------------ log-likelihood
    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        """Score ``((context, continuation), context_ids, continuation_ids)`` requests.

        The model reads ``(ctx + cont)[-(max_length + 1):][:-1]`` (HFLM's left truncation) and the
        continuation is scored on its last ``len(cont)`` predictions. Requests with identical model
        inputs (one-token continuations of one context) share a row.
        """
        if self.scorer is None:
            raise RuntimeError("this model was built without a scorer (log-likelihood backend)")
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError(f"request {i}: empty continuation")
            groups.setdefault(tuple((ctx + cont)[-(self.max_length + 1):][:-1]), []).append(i)
        keys = sorted(groups, key=lambda k: -len(k))  # longest first: little padding per batch
        rows: list[Row] = [(list(k), [requests[i][2] for i in groups[k]]) for k in keys]
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for k, scored in zip(keys, self.scorer.score(rows)):
            for i, r in zip(groups[k], scored):
                results[i] = r
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], r)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each string, in disjoint windows of ``max_length`` (as HFLM)."""
        windows: list[Any] = []
        owner: list[int] = []
        for n, (string,) in enumerate(r.args for r in requests):
            for w in map(lm_utils.make_disjoint_window,
                         lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                            prefix_token=self.prefix_token_id,
                                                            max_seq_len=self.max_length, context_len=1)):
                windows.append((None, *w))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[n] += ll
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    # ------------------------------------------------------------ generation
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Generate for each ``(context, gen_kwargs)`` request; requests with equal settings batch together.

        Sampling: lm-eval repeats a request n times (``repeats: n``); the copies sit in one batch or
        follow each other and draw different samples from one random stream (never reseeded here).
        """
        if self.generator is None:
            raise RuntimeError("this model was built without a generator")
        eos = self.tokenizer.decode([self.eot_token_id])
        out: list[str | None] = [None] * len(requests)
        by_kwargs: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            by_kwargs.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        for idx in by_kwargs.values():
            kwargs = normalize_gen_kwargs(dict(requests[idx[0]].args[1]), self._max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
            if kwargs:
                log.warning("generation settings not supported and ignored: %s", sorted(kwargs))
            keep = max(1, self.max_length - max_new)
            prompts = {i: self.tok_encode(requests[i].args[0])[-keep:] for i in idx}
            order = sorted(idx, key=lambda i: -len(prompts[i]))
            for b in range(0, len(order), self.batch_size):
                chunk = order[b : b + self.batch_size]
                gens = self.generator.generate([prompts[i] for i in chunk], max_new_tokens=max_new,
                                               do_sample=do_sample, temperature=temperature, top_p=top_p, stop=until)
                for i, g in zip(chunk, gens):
                    text = postprocess_generated_text(self.tok_decode(g), until, None)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out  # type: ignore[return-value]

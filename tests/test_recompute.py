"""Activation recompute (``model.recompute_*``): the same gradients, less memory, as the plan predicts.

One process builds the tiny Llama (local spec, fp32, the same weights) four times: no recompute,
``selective`` (megatron recomputes the core attention), ``full``/``uniform`` with one layer per
group and ``full``/``block`` over two of the four layers. Each runs forward and backward on the
same packed micro-batch (samples of several lengths, seq 256).

- Every parameter gradient equals the no-recompute one bit for bit (recompute replays the same
  kernels on the same inputs).
- Memory is measured by torch's profiler (``profile_memory``: every CPU allocation and free):
  what is held when the forward ends (the activations kept for backward) and the peak. The
  kept activations drop from the no-recompute run by what :func:`psft_megatron.plan.stage_activations`
  predicts, within 20%, and so does their total once this test's own head (logits and their
  log-softmax) is added; the peak drops too, and full recompute's by the planner's figure
  within 20%. Measured (MB kept, measured / planned): none 22.57 / 22.56, selective 14.50 / 14.17,
  full uniform 2.69 / 2.64, full block 12.63 / 12.61.
- LoRA (``model.lora``, the base frozen): with adapters on q and v only, the frozen linears keep
  no inputs; with adapters everywhere and dropout, each adapted linear keeps its dropped input and
  mask: the change from the full model's kept activations is the plan's, within 20%.
"""

from __future__ import annotations

import pytest
import torch
from activation_memory import nll_step, packed_micro_batch, profiled_memory

from psft_megatron.testing.multiproc import run_in_processes
from psft_megatron.testing.recipes import TINY_MODEL

pytestmark = pytest.mark.slow

SEQ, ROWS = 256, 2
VARIANTS = {
    "none": {},
    "selective": {"recompute_granularity": "selective"},
    "full_uniform": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    "full_block": {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2},
}
LORA_VARIANTS = {
    "lora_qv": {"lora": {"rank": 8, "target_modules": ["q_proj", "v_proj"]}},
    "lora_all_dropout": {"lora": {"rank": 8, "dropout": 0.1}},
}
MODEL = {**TINY_MODEL, "max_position_embeddings": SEQ}


def _measure() -> dict:
    from psft_megatron.model.build import build_model
    from psft_megatron.model.config import ModelConfig
    from psft_megatron.model.init import init_layout_independent
    from psft_megatron.runtime.config import ParallelConfig
    from psft_megatron.runtime.distributed import init_distributed, init_model_parallel, set_seed

    init_distributed()
    parallel = ParallelConfig()
    init_model_parallel(parallel)
    mb = packed_micro_batch(SEQ)
    out = {}
    for name, fields in {**VARIANTS, **LORA_VARIANTS}.items():
        set_seed(3)
        built = build_model(ModelConfig(**MODEL, **fields), parallel)
        init_layout_independent(built.chunks, 3)
        chunk = built.chunks[0]

        step = nll_step(chunk, mb)
        step()  # warm-up: the gradients exist before the measured step (they are not activations)
        grads_first = {n: p.grad.detach().clone() for n, p in chunk.named_parameters() if p.grad is not None}
        for p in chunk.parameters():
            p.grad = None
        kept, peak = profiled_memory(step)
        out[name] = {"grads": grads_first, "kept": kept, "peak": peak,
                     "config": {f: getattr(chunk.config, f) for f in ("recompute_granularity", "recompute_method",
                                                                      "recompute_num_layers")}}
    return out


def _planned() -> dict[str, dict[str, float]]:
    """The plan's activations kept and working memory of the one chunk, per variant (CPU kernels)."""
    from psft_megatron.model.config import ModelConfig
    from psft_megatron.plan import Shape, kernels_for, stage_activations

    sh = Shape(seq=SEQ, micro=ROWS, act_bytes=4)
    out = {}
    for name, fields in {**VARIANTS, **LORA_VARIANTS}.items():
        m = ModelConfig(**MODEL, **fields)
        a = stage_activations(m, kernels_for("local", 4), sh, m.num_layers, first=True, last=True)
        out[name] = {"kept": a["kept"], "peak": a["kept"] + a["working"]}
    return out


@pytest.fixture(scope="module")
def measured() -> dict:
    return run_in_processes(_measure, 1, timeout=300)[0]


def test_recompute_reaches_megatron(measured):
    assert measured["none"]["config"]["recompute_granularity"] is None
    assert measured["selective"]["config"]["recompute_granularity"] == "selective"
    assert measured["full_block"]["config"] == {"recompute_granularity": "full", "recompute_method": "block",
                                                "recompute_num_layers": 2}


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "none"])
def test_gradients_identical_to_no_recompute(measured, name):
    ref, got = measured["none"]["grads"], measured[name]["grads"]
    assert sorted(got) == sorted(ref)
    for n, g in ref.items():
        assert torch.equal(got[n], g), f"{name}: {n} max diff {(got[n] - g).abs().max()}"


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "none"])
def test_kept_activations_drop_as_planned(measured, name):
    plan = _planned()
    want = plan["none"]["kept"] - plan[name]["kept"]
    got = measured["none"]["kept"] - measured[name]["kept"]
    assert want > 0 and got == pytest.approx(want, rel=0.2), (
        f"{name}: kept activations dropped by {got / 1e6:.3f} MB, the plan says {want / 1e6:.3f} MB")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_kept_activations_as_planned(measured, name):
    """Absolute: the plan's chunk activations plus this test's own head (the logits and their
    log-softmax, both alive until backward: 2 x tokens x vocab x fp32)."""
    head = 2 * SEQ * ROWS * MODEL["vocab_size"] * 4
    want = _planned()[name]["kept"] + head
    assert measured[name]["kept"] == pytest.approx(want, rel=0.2), (
        f"{name}: {measured[name]['kept'] / 1e6:.3f} MB kept, the plan says {want / 1e6:.3f} MB")


def test_peak_memory_drops_with_recompute(measured):
    plan = _planned()
    peaks = {n: measured[n]["peak"] for n in VARIANTS}
    assert all(peaks[n] < peaks["none"] for n in VARIANTS if n != "none"), peaks
    want = plan["none"]["peak"] - plan["full_uniform"]["peak"]
    got = peaks["none"] - peaks["full_uniform"]
    assert got == pytest.approx(want, rel=0.2), f"peak dropped by {got / 1e6:.3f} MB, the plan says {want / 1e6:.3f} MB"


@pytest.mark.parametrize("name", list(LORA_VARIANTS))
def test_lora_activations_change_as_planned(measured, name):
    """The frozen base keeps no linear inputs (q/v only: fewer kept); adapters everywhere with dropout
    keep each adapted linear's dropped input and mask (more kept): the change is the plan's."""
    plan = _planned()
    want = plan[name]["kept"] - plan["none"]["kept"]
    got = measured[name]["kept"] - measured["none"]["kept"]
    assert abs(want) > 0.05 * plan["none"]["kept"], f"{name}: a change of {want / 1e6:.3f} MB is too small to test"
    assert got == pytest.approx(want, rel=0.2), (
        f"{name}: kept activations changed by {got / 1e6:.3f} MB, the plan says {want / 1e6:.3f} MB")
    assert all(".lora_" in n for n in measured[name]["grads"])  # only the adapters got gradients

"""A fresh model's random weights are the same at every layout (TP=1, PP=2, TP=2, PP=2 x VP=2).

Each layout's shards are assembled into global tensors by their checkpoint keys and
offsets and compared bit for bit with the single-process model; the distributions are
checked against megatron's (normal(0, 0.02), the scaled output projections, ones for
norms, zeros for biases).
"""

from __future__ import annotations

import math

import pytest
import torch

from psft_megatron.testing.multiproc import run_in_processes
from psft_megatron.testing.recipes import TINY_MODEL

pytestmark = pytest.mark.slow


def _shards(parallel: dict) -> dict[tuple, torch.Tensor]:
    """{(key, global offset, global shape): local tensor} of this rank's layout-independent init."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from psft_megatron.model.build import build_model
    from psft_megatron.model.config import ModelConfig
    from psft_megatron.model.init import init_layout_independent
    from psft_megatron.runtime.config import ParallelConfig
    from psft_megatron.runtime.distributed import init_distributed, init_model_parallel, set_seed

    init_distributed()
    par = ParallelConfig(**parallel)
    init_model_parallel(par)
    set_seed(3)
    model = ModelConfig(**dict(TINY_MODEL, tie_word_embeddings=False, qkv_bias=True))
    built = build_model(model, par)
    init_layout_independent(built.chunks, seed=11)
    out = {}
    for chunk in built.chunks:
        sd = chunk.sharded_state_dict()
        apply_factories(sd)
        for sh in nested_values(sd):
            if isinstance(sh, ShardedTensor) and not sh.key.endswith("_extra_state"):
                out[(sh.key, tuple(sh.global_offset), tuple(sh.global_shape))] = sh.data.detach().clone()
    return out


def _assemble(parts: list[dict[tuple, torch.Tensor]]) -> dict[tuple, torch.Tensor]:
    """{(key, layer offsets): global tensor} from every rank's shards."""
    full: dict[tuple, torch.Tensor] = {}
    for part in parts:
        for (key, offset, shape), t in part.items():
            p = len(shape) - t.dim()
            name = (key, offset[:p])
            g = full.setdefault(name, torch.full(shape[p:], float("nan")))
            g[tuple(slice(o, o + n) for o, n in zip(offset[p:], t.shape))] = t
    return full


@pytest.fixture(scope="module")
def layouts() -> dict[str, dict[tuple, torch.Tensor]]:
    runs = {
        "tp1": (1, {}),
        "pp2": (2, {"pipeline_model_parallel_size": 2}),
        "tp2": (2, {"tensor_model_parallel_size": 2}),
        "pp2_vp2": (2, {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}),
    }
    return {name: _assemble(run_in_processes(_shards, n, kwargs={"parallel": par})) for name, (n, par) in runs.items()}


@pytest.mark.parametrize("layout", ["pp2", "tp2", "pp2_vp2"])
def test_random_init_is_the_same_at_every_layout(layouts, layout):
    ref, got = layouts["tp1"], layouts[layout]
    assert set(got) == set(ref)
    for name, t in ref.items():
        assert not torch.isnan(got[name]).any(), f"{layout}: {name} not fully covered"
        assert torch.equal(got[name], t), f"{layout}: {name} differs"


def test_distributions_are_megatrons(layouts):
    std, layers = 0.02, TINY_MODEL["num_layers"]
    for (key, _), t in layouts["tp1"].items():
        if key.endswith(".bias"):
            assert torch.count_nonzero(t) == 0, key
        elif t.dim() == 1:
            assert torch.all(t == 1.0), key
        else:
            want = std / math.sqrt(2 * layers) if key.endswith(("linear_proj.weight", "linear_fc2.weight")) else std
            assert abs(float(t.std()) - want) < 0.1 * want and abs(float(t.mean())) < 0.1 * want, key
    # not one stream repeated: layers and tensors differ
    qkv = [t for (k, _), t in layouts["tp1"].items() if k.endswith("linear_qkv.weight")]
    assert len(qkv) == layers and not torch.equal(qkv[0], qkv[1])

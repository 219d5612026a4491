"""GPU-only checks (skipped without CUDA). Run on one GPU by benchmarks/gpu_check.sh, or
`python -m pytest -q tests/test_gpu.py`; written in sessions without a GPU.

One real process on NCCL (``run_in_processes(..., init_process_group=False)``, so the rank's
own ``init_distributed`` picks the backend, as a launch does) runs every distributed part;
each part reports its own error, so one failure does not hide the others:

- NCCL set-up: the default group and every megatron group are NCCL; all-reduce,
  all-gather-into-tensor, reduce-scatter (the distributed optimizer's collectives) and a
  coalesced all-reduce (megatron DDP's) give the sums written here, on CUDA tensors.
- bf16 init_from reaches megatron's fp32 main params: with a learning rate far below bf16
  resolution, the weights after training must still be the init_from weights (had the
  optimizer copied a random init instead, step 1 would overwrite them).
- The distributed optimizer at DP=1, bf16: a run stopped after 2 steps (exit_after_steps)
  saves its state; the trainer built again resumes it. Every fp32 main param, Adam moment
  and bf16 weight the resumed trainer holds equals what the stopped one held, bit for bit,
  and differs from the initial state; the main params are the fp32 masters of the bf16
  weights (they round to them and hold finer bits).
- That stopped-and-resumed run gives the uninterrupted run's metrics, as closely as two
  uninterrupted runs agree with each other (bit for bit where CUDA is deterministic; atomics
  in the embedding's backward may not be).
- The loss against megatron's own vocab_parallel_cross_entropy on CUDA (values and gradients).
- LoRA in bf16 with the distributed optimizer: only the adapters are in the optimizer, each with
  an fp32 main param; the frozen bf16 base is bit for bit the base checkpoint after training while
  every adapter B moved; the saved checkpoint holds the adapters alone and names its base.

In the pytest process, the loss layer on CUDA against float64 math on the CPU written here:
fp32 and bf16 logits, chunked, in place, a padded vocabulary, a 128k vocabulary, PSFT's
micro-batch loss and statistics, and the fused output head on logits that are exact.
"""

from __future__ import annotations

import copy
import math
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from psft_megatron.data.synthetic import write_tiny_dataset
from psft_megatron.testing.multiproc import run_in_processes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda"  # the in-process loss checks' device (a module constant, so a CPU dry run can reuse them)

EPS_LOW, EPS_HIGH = 0.2, 0.28
FP32_TOL = dict(atol=1e-5, rtol=1e-5)  # fp32 arithmetic against float64 (as tests/test_loss_parallel.py)
BF16_GRAD_TOL = dict(atol=1e-5, rtol=2.0**-8)  # gradients returned in bf16: twice the half-ulp
# The trainer's metrics compared between a resumed and an uninterrupted run (as tests/test_trainer.py).
COMPARED = ("loss", "entropy", "clip_frac", "ratio_mean", "ratio_min", "ratio_max", "mean_logp", "grad_norm", "lr", "tokens")


def _recipe(data: Path, tmp: Path) -> dict:
    return {
        "model": {"num_layers": 2, "hidden_size": 128, "ffn_hidden_size": 256, "num_attention_heads": 4,
                  "num_query_groups": 2, "vocab_size": 384, "max_position_embeddings": 128,
                  "params_dtype": "bf16", "transformer_impl": "auto"},
        "training": {"seq_length": 128, "global_batch_size": 4, "mini_batch_size": 2, "micro_batch_size": 2,
                     "train_steps": 4, "seed": 5},
        "optimizer": {"lr": 1e-12, "min_lr": 0.0, "weight_decay": 0.0},
        "data": {"train": [{"path": str(data / "train.jsonl"), "adapter": "generic", "max_length": 128}],
                 "tokenizer": str(data / "tokenizer"), "chat_template": "plain", "cache_dir": str(data / "cache")},
        "checkpoint": {"init_from": str(tmp / "init"), "save_at_end": True},
        "logging": {"run_dir": str(tmp / "run"), "tensorboard": False},
    }


def _resume_recipe(data: Path, tmp: Path) -> dict:
    """bf16, the distributed optimizer, PSFT with k=2 mini-batches; a learning rate that moves weights."""
    r = _recipe(data, tmp)
    r["model"]["transformer_impl"] = "local"
    r["training"].update(micro_batch_size=1, sft_warmup_steps=0)
    r["optimizer"] = {"lr": 1e-3, "min_lr": 1e-4, "weight_decay": 0.1, "clip_grad": 1.0,
                      "use_distributed_optimizer": True}
    r["loss"] = {"name": "psft", "eps_low": EPS_LOW, "eps_high": EPS_HIGH}
    r["checkpoint"] = {"allow_random_init": True, "save_at_end": False}
    return r


# ----------------------------------------------------------------------------- parts run in the NCCL process


def _weights(chunks: list) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for c in chunks for k, v in c.state_dict().items() if "_extra_state" not in k}


def bf16_init_from(recipe_dict: dict) -> float:
    from psft_megatron.checkpoint.model_checkpoint import load_model_checkpoint, save_model_checkpoint
    from psft_megatron.model.build import build_model
    from psft_megatron.recipe import recipe_from_dict
    from psft_megatron.run import run
    from psft_megatron.runtime.distributed import init_distributed, init_model_parallel, set_seed

    init_distributed()
    recipe = recipe_from_dict(copy.deepcopy(recipe_dict))
    init_model_parallel(recipe.parallel)
    set_seed(99)  # the "pretrained" weights: another seed than the training run's init
    pretrained = build_model(recipe.model, recipe.parallel).chunks
    save_model_checkpoint(pretrained, recipe.checkpoint.init_from, {"model": recipe.model.resolve(), "step": 0})
    result = run(recipe)
    init_model_parallel(recipe.parallel)  # run() tore megatron's groups down
    trained = build_model(recipe.model, recipe.parallel).chunks
    load_model_checkpoint(trained, result.last_checkpoint)
    before, after = _weights(pretrained), _weights(trained)
    return max(float((before[k] - after[k]).abs().max()) for k in before)


def _nccl_checks() -> dict:
    """Backends of the default and megatron's groups; collectives on CUDA against sums made here."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from psft_megatron.runtime.config import ParallelConfig
    from psft_megatron.runtime.distributed import init_distributed, init_model_parallel

    env = init_distributed()
    init_model_parallel(ParallelConfig())
    groups = {
        "default": None, "tp": ps.get_tensor_model_parallel_group(), "pp": ps.get_pipeline_model_parallel_group(),
        "dp": ps.get_data_parallel_group(), "dp_cp": ps.get_data_parallel_group(with_context_parallel=True),
        "cp": ps.get_context_parallel_group(),
    }
    dp = groups["dp"]
    world, rank = dist.get_world_size(dp), dist.get_rank(dp)
    n = 4096 * world
    x = torch.randn(n, generator=torch.Generator().manual_seed(3 + rank)).to(env.device)
    summed = x.clone()
    dist.all_reduce(summed, group=dp)
    gathered = torch.empty(n * world, device=env.device)
    dist.all_gather_into_tensor(gathered, x, group=dp)
    scattered = torch.empty(n // world, device=env.device)
    dist.reduce_scatter_tensor(scattered, x.clone(), group=dp)
    a, b = x.clone(), 2 * x
    with dist._coalescing_manager(dp, async_ops=False):  # as megatron DDP issues its bucket reductions
        dist.all_reduce(a, group=dp)
        dist.all_reduce(b, group=dp)
    objs = [{"rank": rank}]
    dist.broadcast_object_list(objs, src=0)
    dist.barrier()
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    # References: every rank's x, made again here on the CPU from the same seeds.
    xs = [torch.randn(n, generator=torch.Generator().manual_seed(3 + r)) for r in range(world)]
    total = torch.stack(xs).sum(0)
    piece = slice(rank * (n // world), (rank + 1) * (n // world))
    return {
        "backend": env.backend, "device": str(env.device), "tensor_device": str(summed.device),
        "group_backends": {k: dist.get_backend(g) for k, g in groups.items()},
        "all_reduce": float((summed.cpu() - total).abs().max()),
        "all_gather": float((gathered.cpu() - torch.cat(xs)).abs().max()),
        "reduce_scatter": float((scattered.cpu() - total[piece]).abs().max()),
        "coalesced": max(float((a.cpu() - total).abs().max()), float((b.cpu() - 2 * total).abs().max())),
        "broadcast": objs[0],
        "world": world,
    }


def _opt_state(bundle: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Per parameter name: the bf16 weight, and the optimizer's fp32 main param and moments (CPU copies).

    Uses the distributed optimizer's own map from a model parameter to its main param and
    state (megatron-core 0.16 names it ``_get_main_param_and_optimizer_states``). An fp32
    optimizer (a CPU dry run of this code) has the parameter itself as its main param."""
    opts = getattr(bundle.optimizer, "chained_optimizers", [bundle.optimizer])
    out: dict[str, dict[str, torch.Tensor]] = {}
    for ci, chunk in enumerate(bundle.model):
        for name, p in chunk.named_parameters():
            for opt in opts:
                if hasattr(opt, "model_param_group_index_map"):
                    if p not in opt.model_param_group_index_map:
                        continue
                    state = opt._get_main_param_and_optimizer_states(p)
                elif any(p is q for g in opt.optimizer.param_groups for q in g["params"]):
                    state = {"param": p, **opt.optimizer.state.get(p, {})}
                else:
                    continue
                out[f"{ci}.{name}"] = {"weight": p.detach().cpu().clone()} | {
                    k: v.detach().cpu().clone() for k, v in state.items() if torch.is_tensor(v)
                }
    return out


def _compare_states(saved: dict, loaded: dict, initial: dict) -> dict:
    """What the state test asserts, reduced to numbers (the tensors stay in this process)."""
    diffs: dict[str, float] = {}
    for name, tensors in saved.items():
        for key, t in tensors.items():
            u = loaded.get(name, {}).get(key)
            diffs[f"{name}:{key}"] = (
                float("inf") if u is None or u.shape != t.shape else float((u.double() - t.double()).abs().max())
            )
    main = {n: t["param"] for n, t in saved.items()}
    return {
        "names": sorted(saved), "names_loaded": sorted(loaded),
        "keys": sorted({k for t in saved.values() for k in t}),
        "max_diff": max(diffs.values()), "worst": max(diffs, key=diffs.get),
        # Every main param moved in training, so a load that left one untouched shows here.
        "moved_from_initial": sum(not torch.equal(initial[n]["param"], loaded[n]["param"]) for n in loaded),
        "main_dtypes": sorted({str(t.dtype) for t in main.values()}),
        "weight_dtypes": sorted({str(t["weight"].dtype) for t in saved.values()}),
        # The bf16 weights are the main params rounded (megatron copies main -> model after each step) ...
        "weight_is_rounded_main": all(
            torch.equal(saved[n]["weight"].reshape(-1), m.reshape(-1).to(torch.bfloat16)) for n, m in main.items()
        ),
        # ... and the main params hold bits below bf16's resolution (real fp32 masters).
        "main_finer_than_bf16": sum(not torch.equal(m, m.to(torch.bfloat16).float()) for m in main.values()),
        "params": len(main),
    }


def _built_trainer(recipe_dict: dict) -> Any:
    """What psft_megatron.run.run does before train(): groups, seed, build (and resume)."""
    from psft_megatron.recipe import recipe_from_dict
    from psft_megatron.run import build_trainer
    from psft_megatron.runtime.distributed import init_distributed, init_model_parallel, set_seed

    recipe = recipe_from_dict(copy.deepcopy(recipe_dict))
    env = init_distributed()
    init_model_parallel(recipe.parallel)
    set_seed(recipe.training.seed)
    return build_trainer(recipe, env)


def _distributed_optimizer_resume(recipe_dict: dict, tmp: str) -> dict:
    """Uninterrupted twice (the determinism control); then stopped after 2 steps, with the
    optimizer state captured as saved, and resumed, with the state captured as loaded."""
    from psft_megatron.recipe import recipe_from_dict
    from psft_megatron.run import run
    from psft_megatron.runtime.distributed import teardown
    from psft_megatron.training.loop import train

    def like(name: str, save: str, **training) -> dict:
        r = copy.deepcopy(recipe_dict)
        r["logging"]["run_dir"] = f"{tmp}/{name}"
        r["checkpoint"]["save_dir"] = f"{tmp}/{save}"
        r["training"].update(training)
        return r

    def records(result: Any) -> dict:
        return {"records": result.records, "step": result.step}

    out = {"ref": records(run(recipe_from_dict(like("ref", "ref_ckpt")))),
           "ctrl": records(run(recipe_from_dict(like("ctrl", "ctrl_ckpt"))))}
    stopping = _built_trainer(like("resume", "resume_ckpt", exit_after_steps=2))
    opts = getattr(stopping.bundle.optimizer, "chained_optimizers", [stopping.bundle.optimizer])
    out["optimizers"] = [type(o).__name__ for o in opts]
    initial = _opt_state(stopping.bundle)
    out["stopped"] = records(train(stopping))
    saved = _opt_state(stopping.bundle)  # the step-2 checkpoint was written from exactly this state
    resuming = _built_trainer(like("resume", "resume_ckpt"))
    loaded = _opt_state(resuming.bundle)
    out["resumed"] = records(train(resuming))
    teardown(destroy_process_group=False)
    out["state"] = _compare_states(saved, loaded, initial)
    return out


def _loss_vs_megatron_ce() -> dict:
    """Our logp and its gradient against megatron's vocab_parallel_cross_entropy, fp32, on the rank's device."""
    from megatron.core import tensor_parallel

    from psft_megatron.loss import vocab_parallel_token_stats
    from psft_megatron.runtime.config import ParallelConfig
    from psft_megatron.runtime.distributed import init_distributed, init_model_parallel

    env = init_distributed()
    init_model_parallel(ParallelConfig())
    g = torch.Generator().manual_seed(11)
    base = (torch.randn(96, 2, 3000, generator=g) * 3.0).to(env.device)
    labels = torch.randint(0, 3000, (96, 2), generator=g).to(env.device)
    ours_in = base.clone().requires_grad_()
    ours = vocab_parallel_token_stats(ours_in, labels, chunk_size=40).logp
    (-ours).sum().backward()
    theirs_in = base.clone().requires_grad_()
    ce = tensor_parallel.vocab_parallel_cross_entropy(theirs_in * 1.0, labels)  # * 1.0: megatron writes into its input
    ce.sum().backward()
    return {
        "logp": float((ours.detach() + ce.detach()).abs().max()),
        "grad": float((ours_in.grad - theirs_in.grad).abs().max()),
        "grad_scale": float(theirs_in.grad.abs().max()),
        "device": str(ours.device), "mcore_device": str(ce.device),
    }


def _lora_bf16(recipe_dict: dict, tmp: str) -> dict:
    """A bf16 LoRA run (the distributed optimizer) from a saved random base: what trains, and in what."""
    import json

    from torch.distributed.checkpoint import FileSystemReader

    from psft_megatron.checkpoint.model_checkpoint import save_model_checkpoint
    from psft_megatron.model.build import build_model
    from psft_megatron.recipe import recipe_from_dict
    from psft_megatron.runtime.distributed import init_distributed, init_model_parallel, set_seed, teardown
    from psft_megatron.training.loop import train

    r = copy.deepcopy(recipe_dict)
    r["model"]["transformer_impl"] = "local"
    r["optimizer"] = {"lr": 1e-2, "min_lr": 1e-3, "weight_decay": 0.0, "use_distributed_optimizer": True}
    r["checkpoint"] = {"init_from": f"{tmp}/lora_base", "save_at_end": True}
    r["logging"]["run_dir"] = f"{tmp}/lora_run"
    base_recipe = recipe_from_dict(copy.deepcopy(r))
    init_distributed()
    init_model_parallel(base_recipe.parallel)
    set_seed(17)
    base = build_model(base_recipe.model, base_recipe.parallel).chunks
    save_model_checkpoint(base, f"{tmp}/lora_base", {"model": base_recipe.model.resolve()})
    r["model"]["lora"] = {"rank": 8, "alpha": 16}
    trainer = _built_trainer(r)
    before = _opt_state(trainer.bundle)
    result = train(trainer)
    after = _opt_state(trainer.bundle)
    base_w = {k: v for k, v in _weights(base).items()}
    trained_w = {k: v for k, v in _weights([c.module for c in trainer.bundle.model]).items() if "lora_" not in k}
    ckpt = result.last_checkpoint
    keys = FileSystemReader(str(ckpt / "model")).read_metadata().state_dict_metadata
    teardown(destroy_process_group=False)
    return {
        "optimized": sorted(before), "main_dtypes": sorted({str(t["param"].dtype) for t in after.values()}),
        "weight_dtypes": sorted({str(t["weight"].dtype) for t in after.values()}),
        "b_moved": all(not torch.equal(before[n]["param"], after[n]["param"]) for n in before if ".lora_B." in n),
        "base_changed": max(float((trained_w[k] - base_w[k]).abs().max()) for k in base_w),
        "base_names_equal": sorted(base_w) == sorted(trained_w),
        "ckpt_keys": sorted(k for k in keys if not k.endswith("_extra_state")),
        "lora_base": json.loads((ckpt / "psft_meta.json").read_text()).get("lora_base"),
        "base_dir": f"{tmp}/lora_base",
    }


def _part(fn: Callable[..., Any], *args: Any) -> dict:
    try:
        return {"ok": True, "value": fn(*args)}
    except Exception:  # reported by the test that reads this part; the other parts still run
        return {"ok": False, "error": traceback.format_exc()[-4000:]}


def gpu_process(init_recipe: dict, resume_recipe: dict, tmp: str) -> dict:
    """Every distributed part, in one process (start-up, megatron import and NCCL set-up once)."""
    return {
        "nccl": _part(_nccl_checks),
        "init_from": _part(bf16_init_from, init_recipe),
        "resume": _part(_distributed_optimizer_resume, resume_recipe, tmp),
        "mcore_ce": _part(_loss_vs_megatron_ce),
        "lora_bf16": _part(_lora_bf16, resume_recipe, tmp),
    }


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu")
    write_tiny_dataset(tmp / "data", train=200, eval=8)
    return run_in_processes(
        gpu_process, 1,
        kwargs={"init_recipe": _recipe(tmp / "data", tmp), "resume_recipe": _resume_recipe(tmp / "data", tmp),
                "tmp": str(tmp)},
        # No gloo group made for the rank: its init_distributed picks NCCL, as in a launch.
        init_process_group=False, timeout=600,
    )[0]


def _value(parts: dict, name: str) -> Any:
    part = parts[name]
    assert part["ok"], f"{name} raised on the GPU rank:\n{part['error']}"
    return part["value"]


@pytest.mark.slow  # the parts run in one NCCL process
def test_nccl_process_groups_and_collectives(parts):
    v = _value(parts, "nccl")
    assert v["backend"] == "nccl" and v["device"] == "cuda:0" and v["tensor_device"] == "cuda:0"
    assert v["group_backends"] == {k: "nccl" for k in ("default", "tp", "pp", "dp", "dp_cp", "cp")}
    for op in ("all_reduce", "all_gather", "reduce_scatter", "coalesced"):
        assert v[op] <= 1e-6 * v["world"], f"{op}: off by {v[op]}"
    assert v["broadcast"] == {"rank": 0}


@pytest.mark.slow  # the parts run in one NCCL process
def test_bf16_init_from_survives_the_first_optimizer_steps(parts):
    assert _value(parts, "init_from") == 0.0


@pytest.mark.slow  # the parts run in one NCCL process
def test_distributed_optimizer_state_survives_save_and_resume(parts):
    v = _value(parts, "resume")
    assert v["optimizers"] and all(o == "DistributedOptimizer" for o in v["optimizers"]), v["optimizers"]
    s = v["state"]
    assert s["params"] > 0 and s["names"] == s["names_loaded"]
    assert {"weight", "param", "exp_avg", "exp_avg_sq"} <= set(s["keys"])
    assert s["main_dtypes"] == ["torch.float32"] and s["weight_dtypes"] == ["torch.bfloat16"]
    assert s["moved_from_initial"] == s["params"], "some main params were not restored (still the initial ones)"
    assert s["max_diff"] == 0.0, f"{s['worst']} differs by {s['max_diff']} between save and resume"
    assert s["weight_is_rounded_main"]
    assert s["main_finer_than_bf16"] > 0, "the fp32 main params hold nothing finer than bf16"


def _max_diff(a: list[dict], b: list[dict]) -> float:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    return max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in COMPARED)


@pytest.mark.slow  # the parts run in one NCCL process
def test_distributed_optimizer_stop_and_resume_matches_uninterrupted(parts):
    v = _value(parts, "resume")
    ref, ctrl = v["ref"]["records"], v["ctrl"]["records"]
    stopped, resumed = v["stopped"], v["resumed"]
    assert [r["step"] for r in ref] == [1, 2, 3, 4]
    assert stopped["step"] == 2 and resumed["step"] == 4
    assert [r["step"] for r in resumed["records"]] == [3, 4]
    assert all(math.isfinite(r[k]) for r in ref for k in COMPARED)
    assert ref[-1]["loss"] != ref[0]["loss"], "training did not move"
    noise = _max_diff(ctrl, ref)  # two uninterrupted runs: this GPU's run-to-run spread
    got = _max_diff(stopped["records"] + resumed["records"], ref)
    # Bit for bit where the runs are deterministic; else within a few times their own spread.
    assert got <= 4 * noise, f"the resumed run differs by {got}, two uninterrupted runs by {noise}"


@pytest.mark.slow  # the parts run in one NCCL process
def test_loss_matches_megatron_cross_entropy_on_cuda(parts):
    v = _value(parts, "mcore_ce")
    assert v["device"] == v["mcore_device"] == "cuda:0"
    assert v["logp"] <= 1e-4  # |logp| ~ 10: fp32 rounding of two different reductions
    assert v["grad"] <= 1e-6 and v["grad_scale"] > 0.5


# ----------------------------------------------------------------------------- the loss on CUDA, in process


def _ref_token_stats(full: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 log-prob of each label and entropy from the full logits (differentiable)."""
    logq = torch.log_softmax(full, dim=-1)
    lp = logq.gather(-1, labels.clamp(0, full.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
    return lp, -(logq.exp() * logq).sum(-1)


def _inputs(s: int, b: int, v_pad: int, v: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    full = (torch.randn(s, b, v_pad, generator=g) * 4.0).to(dtype)
    labels = torch.randint(0, v, (s, b), generator=g)
    mask = torch.rand(s, b, generator=g) < 0.8
    labels[~mask & (torch.rand(s, b, generator=g) < 0.5)] = -100
    return full, labels, mask, torch.randn(s, b, generator=g), torch.randn(s, b, generator=g)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.slow  # the parts run in one NCCL process
def test_lora_bf16_trains_the_adapters_alone_in_fp32_main_params(parts):
    v = _value(parts, "lora_bf16")
    assert v["optimized"] and all(".lora_A." in n or ".lora_B." in n for n in v["optimized"])
    assert v["main_dtypes"] == ["torch.float32"] and v["weight_dtypes"] == ["torch.bfloat16"]
    assert v["b_moved"], "every adapter's B must have left zero"
    assert v["base_names_equal"] and v["base_changed"] == 0.0, "the frozen base must be the base checkpoint exactly"
    assert v["ckpt_keys"] and all(".lora_A." in k or ".lora_B." in k for k in v["ckpt_keys"])
    assert v["lora_base"] == str(Path(v["base_dir"]).resolve())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_token_stats_on_cuda_match_float64_reference(dtype):
    from psft_megatron.loss import vocab_parallel_token_stats

    grad_tol = FP32_TOL if dtype == torch.float32 else BF16_GRAD_TOL
    checked = 0
    for v_pad, v in ((1000, None), (1024, 1000)):  # no padding; 24 padded output columns
        vt = v or v_pad
        full, labels, mask, w, u = _inputs(16, 3, v_pad, vt, dtype, seed=v_pad)
        z = full.double()[..., :vt].clone().requires_grad_()
        lp_ref, ent_ref = _ref_token_stats(z, labels)
        (grad_ref,) = torch.autograd.grad((torch.where(mask, lp_ref, 0.0) * w.double() + ent_ref * u.double()).sum(), z)
        for chunk in (None, 7):
            for inplace in (False, True):
                logits = full.to(DEV, copy=True).requires_grad_()
                before = logits.detach().clone()
                ts = vocab_parallel_token_stats(logits, labels.to(DEV), chunk_size=chunk, inplace=inplace, vocab_size=v)
                assert torch.equal(logits.detach(), before), "forward modified the logits"
                (torch.where(mask.to(DEV), ts.logp, 0.0) * w.to(DEV) + ts.entropy * u.to(DEV)).sum().backward()
                assert ts.logp.device.type == DEV and ts.logp.dtype == torch.float32
                torch.testing.assert_close(ts.logp.cpu()[mask].double(), lp_ref.detach()[mask], **FP32_TOL)
                torch.testing.assert_close(ts.entropy.cpu().double(), ent_ref.detach(), **FP32_TOL)
                grad = logits.grad.cpu()
                assert grad.dtype == dtype
                torch.testing.assert_close(grad[..., :vt].double(), grad_ref, **grad_tol)
                assert torch.equal(grad[..., vt:], torch.zeros_like(grad[..., vt:])), "padded columns got gradient"
                checked += 1
    assert checked == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_token_stats_on_cuda_at_llama3_vocabulary(dtype):
    """V = 128,256 over 300 tokens: the automatic CUDA chunking splits them; relative errors."""
    from psft_megatron.loss import vocab_parallel_token_stats
    from psft_megatron.loss.token_stats import auto_chunk_size

    s, b, v = 100, 3, 128256
    assert auto_chunk_size(v, DEV) < s * b, "the check must span several chunks"
    full, labels, mask, w, u = _inputs(s, b, v, v, dtype, seed=7)
    z = full.double().requires_grad_()
    lp_ref, ent_ref = _ref_token_stats(z, labels)
    (grad_ref,) = torch.autograd.grad((torch.where(mask, lp_ref, 0.0) * w.double() + ent_ref * u.double()).sum(), z)
    logits = full.to(DEV, copy=True).requires_grad_()
    ts = vocab_parallel_token_stats(logits, labels.to(DEV))
    (torch.where(mask.to(DEV), ts.logp, 0.0) * w.to(DEV) + ts.entropy * u.to(DEV)).sum().backward()
    torch.testing.assert_close(ts.logp.cpu()[mask].double(), lp_ref.detach()[mask], **FP32_TOL)
    torch.testing.assert_close(ts.entropy.cpu().double(), ent_ref.detach(), **FP32_TOL)
    # Per element most gradients are ~1/V, under any useful atol: compare as a whole instead.
    # fp32: rounding of fp32 arithmetic (~1e-7); bf16: the gradient's own rounding (<= 2**-9 each).
    assert _rel(logits.grad.cpu(), grad_ref) < (1e-5 if dtype == torch.float32 else 2.0**-8)


def test_psft_micro_batch_loss_on_cuda_matches_float64_reference():
    from psft_megatron.loss import ObjectiveConfig, micro_batch_loss

    s, b, v = 24, 2, 512
    full, labels, mask, _, _ = _inputs(s, b, v, v, torch.float32, seed=21)
    z = full.double().requires_grad_()
    lp_ref, ent_ref = _ref_token_stats(z, labels)
    g = torch.Generator().manual_seed(5)
    lp_old = (lp_ref.detach() + (torch.rand(s, b, generator=g) - 0.5) * 1.2).float()  # ratios in ~[0.55, 1.8]
    r = torch.exp(torch.clamp(lp_ref - lp_old.double(), -20.0, 20.0))
    per_token = -torch.minimum(r, torch.clamp(r, 1 - EPS_LOW, 1 + EPS_HIGH))
    count = int(mask.sum())
    loss_ref = torch.where(mask, per_token, 0.0).sum() / count
    (grad_ref,) = torch.autograd.grad(loss_ref, z)

    logits = full.to(DEV, copy=True).requires_grad_()
    cfg = ObjectiveConfig(name="psft", eps_low=EPS_LOW, eps_high=EPS_HIGH)
    out = micro_batch_loss(logits, labels.to(DEV), mask.to(DEV), torch.tensor(count, device=DEV), cfg,
                           lp_old.to(DEV), chunk_size=5)
    out.loss.backward()
    assert out.loss.device.type == DEV
    torch.testing.assert_close(out.loss.detach().cpu().double(), loss_ref.detach(), **FP32_TOL)
    torch.testing.assert_close(logits.grad.cpu().double(), grad_ref, **FP32_TOL)
    summ = out.stats.summary()
    ratio = r.detach()[mask]
    assert summ["token_count"] == float(count)
    for key, ref in {
        "loss": float(loss_ref.detach()), "mean_logp": float(lp_ref.detach()[mask].mean()),
        "mean_entropy": float(ent_ref.detach()[mask].mean()), "ratio_mean": float(ratio.mean()),
        "ratio_min": float(ratio.min()), "ratio_max": float(ratio.max()),
        "clip_fraction": float((ratio > 1 + EPS_HIGH).double().mean()),
    }.items():
        assert math.isclose(summ[key], ref, rel_tol=1e-5, abs_tol=1e-5), (key, summ[key], ref)
    assert 0.0 < summ["clip_fraction"] < 1.0 and summ["ratio_min"] < 1 - EPS_LOW


def _exact_head(T: int, h: int, V: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden [T, h] and weight [V, h] in multiples of 1/4 in [-1, 1]: every product is a multiple
    of 1/16 in [-1, 1] and every partial sum of h = 16 of them one in [-16, 16], at most 8
    significant bits: the logits x @ W^T are exact in fp32 and in bf16, in any summation order."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-4, 5, (T, h), generator=g) / 4.0, torch.randint(-4, 5, (V, h), generator=g) / 4.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_output_head_on_cuda_matches_float64_reference(dtype):
    """fused_token_stats (the output layer and the loss in one pass) on exact logits: values within
    fp32 rounding of float64 for both weight dtypes; fp32 hidden and weight gradients likewise."""
    from psft_megatron.loss import fused_token_stats

    T, h, v_pad, v = 40, 16, 1024, 1000
    x, W = _exact_head(T, h, v_pad, seed=13)
    g = torch.Generator().manual_seed(14)
    labels = torch.randint(0, v, (T,), generator=g)
    w, u = torch.randn(T, generator=g), torch.randn(T, generator=g)
    z64 = x.double() @ W.double()[:v].t()
    assert torch.equal((x.to(dtype) @ W.to(dtype)[:v].t()).double(), z64), "the test's logits must be exact"
    zr = z64.clone().requires_grad_()
    lp_ref, ent_ref = _ref_token_stats(zr, labels)
    (gz,) = torch.autograd.grad((lp_ref * w.double() + ent_ref * u.double()).sum(), zr)
    gx_ref, gW_ref = gz @ W.double()[:v], gz.t() @ x.double()
    for chunk in (None, 7):
        xs, Ws = x.to(DEV, dtype, copy=True).requires_grad_(), W.to(DEV, dtype, copy=True).requires_grad_()
        ts = fused_token_stats(xs, Ws, labels.to(DEV), chunk_size=chunk, vocab_size=v)
        (ts.logp * w.to(DEV) + ts.entropy * u.to(DEV)).sum().backward()
        assert ts.logp.device.type == DEV and ts.logp.dtype == torch.float32
        torch.testing.assert_close(ts.logp.cpu().double(), lp_ref.detach(), **FP32_TOL)
        torch.testing.assert_close(ts.entropy.cpu().double(), ent_ref.detach(), **FP32_TOL)
        assert torch.equal(Ws.grad[v:].cpu(), torch.zeros_like(Ws.grad[v:].cpu())), "padded rows got gradient"
        if dtype == torch.float32:  # bf16 gradients carry the rounding of g to bf16 in every product
            torch.testing.assert_close(xs.grad.cpu().double(), gx_ref, **FP32_TOL)
            torch.testing.assert_close(Ws.grad[:v].cpu().double(), gW_ref, **FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_head_loss_on_cuda_matches_float64_and_the_recomputing_head(dtype):
    """fused_head_loss (the trainer's fused head: gradient formed in forward, the weight's straight
    into an fp32 main_grad, cuBLAS's bf16 x bf16 -> fp32 accumulation) against float64 (fp32) and
    against fused_token_stats' recomputing backward on the same device and dtype."""
    from psft_megatron.loss import fused_head_loss, fused_token_stats

    T, h, v_pad, v = 40, 16, 1024, 1000
    x, W = _exact_head(T, h, v_pad, seed=15)
    g = torch.Generator().manual_seed(16)
    labels = torch.randint(0, v, (T,), generator=g)
    w = torch.randn(T, generator=g)
    zr = (x.double() @ W.double()[:v].t()).requires_grad_()
    lp_ref, _ = _ref_token_stats(zr, labels)
    (gz,) = torch.autograd.grad(2.0 * (lp_ref * w.double()).sum(), zr)
    gx_ref, gW_ref = gz @ W.double()[:v], gz.t() @ x.double()
    wd = w.to(DEV)
    for chunk in (None, 7):
        grads = []
        for fused_loss in (True, False):
            xs = x.to(DEV, dtype, copy=True).requires_grad_()
            Ws = torch.nn.Parameter(W.to(DEV, dtype, copy=True))
            Ws.main_grad = torch.zeros(Ws.shape, dtype=torch.float32, device=DEV)
            Ws.grad_added_to_main_grad = False
            if fused_loss:
                loss, ts = fused_head_loss(xs, Ws, labels.to(DEV), lambda lp, r: lp * wd[r], chunk_size=chunk,
                                           vocab_size=v, grad_scale=2.0)  # fmt: skip
            else:
                ts = fused_token_stats(xs, Ws, labels.to(DEV), chunk_size=chunk, vocab_size=v, with_entropy=False)
                loss = (ts.logp * wd).sum()
            (2.0 * loss).backward()
            assert Ws.grad_added_to_main_grad is True
            torch.testing.assert_close(ts.logp.cpu().double(), lp_ref.detach(), **FP32_TOL)
            grads.append((xs.grad.cpu(), Ws.main_grad.cpu()))
        (gx, gW), (gx_r, gW_r) = grads
        assert torch.equal(gW[v:], torch.zeros_like(gW[v:])), "padded rows got gradient"
        if dtype == torch.float32:
            torch.testing.assert_close(gx.double(), gx_ref, **FP32_TOL)
            torch.testing.assert_close(gW[:v].double(), gW_ref, **FP32_TOL)
        # The same fp32 logits gradient, rounded alike, in the same products: equal up to summation order.
        torch.testing.assert_close(gx.float(), gx_r.float(), atol=1e-5, rtol=2.0**-7 if dtype != torch.float32 else 1e-5)
        torch.testing.assert_close(gW, gW_r, **FP32_TOL)

"""HF <-> Megatron conversion, checked against transformers.

Models: random tiny Llama (Llama-3.1 RoPE scaling, sharded safetensors), Qwen2 (QKV
bias, tied embeddings, vocabulary padding), Mistral (sharded pytorch_model*.bin), Qwen3
(query/key norms, head_dim 32 while hidden / heads is 16, tied embeddings) and Qwen3-MoE
(4 experts, top 2 renormalised, layer 1 dense via mlp_only_layers, sharded safetensors with one
tensor per expert), plus the real SmolLM2-135M-Instruct (GGUF dequantised by the project's
reader, conftest.py's smollm2_hf) on GSM8K text.

* one 1-process launch: convert every model, TP=1 logits vs transformers, export back
  bit-exact, error cases, tools/score.py vs transformers' NLL;
* one 2-process launch: TP=2 (with SP for the MoE model: megatron's MoE layer requires it)
  then PP=2 logits for every model (SmolLM2 has 3 key/value heads, so PP=2 only), EP=2 logits
  for the MoE model (each rank holds 2 experts), a TP=2 re-save, and scoring at PP=2;
* tools/convert_megatron_to_hf.py on the TP=2-saved checkpoint: bit-exact, loads in transformers.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from psft_megatron.testing.multiproc import run_in_processes

pytestmark = pytest.mark.slow  # every test here starts processes

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GGUF_DIR = SHARED / "models" / "smollm2-135m-instruct-gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOL = 1e-4
TINY = ("llama", "qwen2", "mistral", "qwen3", "qwen3_moe")


# --------------------------------------------------------------------------- HF fixtures (parent process)


def _tiny_hf(name: str) -> Any:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, attn_implementation="eager")
    torch.manual_seed({"llama": 1, "qwen2": 2, "mistral": 3, "qwen3": 4, "qwen3_moe": 5}[name])
    if name == "llama":
        cfg = LlamaConfig(vocab_size=1000, rope_theta=500000.0, rms_norm_eps=1e-5, **common,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
        model = LlamaForCausalLM(cfg)
    elif name == "qwen2":
        cfg = Qwen2Config(vocab_size=1100, tie_word_embeddings=True, rope_theta=1e6, **common)
        model = Qwen2ForCausalLM(cfg)
    elif name == "qwen3":
        cfg = Qwen3Config(vocab_size=1000, head_dim=32, tie_word_embeddings=True, rope_theta=1e6, **common)
        model = Qwen3ForCausalLM(cfg)
    elif name == "qwen3_moe":
        cfg = Qwen3MoeConfig(vocab_size=1000, head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                             norm_topk_prob=True, mlp_only_layers=[1], rope_theta=1e6, experts_implementation="eager",
                             **common)
        model = Qwen3MoeForCausalLM(cfg)
    else:
        cfg = MistralConfig(vocab_size=1000, sliding_window=None, **common)
        model = MistralForCausalLM(cfg)
    with torch.no_grad():  # random norms, biases and router, so a mis-mapped one shows
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            if n.endswith("bias") or n.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    return model.eval()


def _save_bin_shards(model: Any, folder: Path, shards: int = 2) -> None:
    """pytorch_model-*.bin shards + index, as transformers 4.x wrote them (5.x only writes safetensors)."""
    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = list(sd)
    weight_map = {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: sd[n] for n in names[i::shards]}
        torch.save(part, folder / fname)
        weight_map.update({n: fname for n in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _hf_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    for f in sorted(folder.glob("pytorch_model*.bin")):
        out.update(torch.load(f, weights_only=True))
    return out


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module")
def work(tmp_path_factory, request) -> dict[str, Any]:
    """Every HF input folder and the transformers reference outputs."""
    root = tmp_path_factory.mktemp("conv")
    models: dict[str, str] = {}
    refs: dict[str, Any] = {}
    hf: dict[str, Any] = {}
    g = torch.Generator().manual_seed(0)
    for name in TINY:
        model = _tiny_hf(name)
        folder = root / f"{name}_hf"
        if name == "mistral":
            _save_bin_shards(model, folder)
        else:  # llama, qwen3_moe: sharded safetensors; qwen2, qwen3: one file
            model.save_pretrained(folder, max_shard_size="100KB" if name in ("llama", "qwen3_moe") else "50GB")
        ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
        if name == "llama":  # a bf16 copy: must stay bf16, bit for bit
            copy.deepcopy(model).to(torch.bfloat16).save_pretrained(root / "llama_bf16_hf")
        models[name] = str(folder)
        refs[name] = {"ids": ids, "logits": _logits(model, ids)}
        hf[name] = model

    smol = None
    if (GGUF_DIR / GGUF_NAME).is_file():
        from psft_megatron.data.tokenizer import load_tokenizer

        cache = request.getfixturevalue("smollm2_hf")  # dequantised by the project's GGUF reader
        from transformers import LlamaForCausalLM

        smol = LlamaForCausalLM.from_pretrained(cache, attn_implementation="eager", dtype=torch.float32).eval()
        tok = load_tokenizer(cache)
        rows = [json.loads(line) for line in open(SHARED / "data" / "gsm8k" / "test.jsonl")][:3]
        records = [{"prompt": r["question"] + "\n", "response": r["answer"], "id": f"gsm8k-{i}"}
                   for i, r in enumerate(rows)]
        ids = torch.tensor([(tok.encode(records[0]["prompt"] + records[0]["response"]) * 2)[:40],
                            (tok.encode(records[1]["prompt"] + records[1]["response"]) * 2)[:40]])
        refs["smollm2"] = {"ids": ids, "logits": _logits(smol, ids), "records": records,
                           "nll": _reference_nll(smol, tok, records)}
        models["smollm2"] = str(cache)
        data = root / "score_input.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        refs["score_input"] = str(data)
    return {"root": str(root), "models": models, "refs": refs, "hf": hf, "smol": smol}


def _reference_nll(model: Any, tok: Any, records: list[dict[str, str]]) -> list[float]:
    out = []
    for r in records:
        prompt, response = tok.encode(r["prompt"]), tok.encode(r["response"])
        ids = torch.tensor([prompt + response])
        logp = torch.log_softmax(_logits(model, ids)[0, :-1].double(), -1)
        tok_logp = logp.gather(-1, ids[0, 1:, None])[:, 0]
        out.append(float(-tok_logp[len(prompt) - 1 :].mean()))
    return out


# --------------------------------------------------------------------------- workers (child processes)


def _megatron_logits(ckpt: str, parallel: Any, ids: torch.Tensor, microbatches: int = 0) -> Any:
    """Build at ``parallel``, load ``ckpt``, return full-vocab logits on the last stage (None elsewhere).

    ``microbatches``: split ``ids`` row-wise into that many microbatches and return the list.
    """
    from psft_megatron.checkpoint.model_checkpoint import (
        load_model_checkpoint,
        model_config_of,
        read_meta,
    )
    from psft_megatron.model.build import build_model
    from psft_megatron.model.forward import gather_logits, pipeline_forward
    from psft_megatron.runtime import cpu_compat
    from psft_megatron.runtime.distributed import init_model_parallel, set_seed

    cpu_compat.apply()
    init_model_parallel(parallel)
    set_seed(0)
    cfg = model_config_of(read_meta(ckpt))
    cfg.params_dtype = "fp32"
    built = build_model(cfg, parallel)
    load_model_checkpoint(built.chunks, ckpt)
    mbs = [{"input_ids": part} for part in ids.chunk(microbatches)] if microbatches else [{"input_ids": ids}]
    out = pipeline_forward(built.chunks, mbs, lambda lg, mb: gather_logits(lg, cfg.vocab_size))
    if not out:
        return None
    return out if microbatches else out[0]


def _expect_failure(fn: Any, *args: Any, **kwargs: Any) -> str:
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        return f"{type(e).__name__}: {e}"
    return "no error"


def tp1_worker(root: str, models: dict[str, str], refs: dict[str, Any]) -> dict[str, Any]:
    from psft_megatron.conversion.hf_to_megatron import convert_hf_to_megatron
    from psft_megatron.conversion.megatron_to_hf import convert_megatron_to_hf
    from psft_megatron.runtime.config import ParallelConfig

    out: dict[str, Any] = {"reports": {}, "diff": {}, "errors": {}}
    for name, hf in models.items():
        ckpt = f"{root}/{name}_mg"
        out["reports"][name] = convert_hf_to_megatron(hf, ckpt)
        logits = _megatron_logits(ckpt, ParallelConfig(), refs[name]["ids"])
        out["diff"][name] = float((logits - refs[name]["logits"]).abs().max())
        out["reports"][f"{name}_export"] = convert_megatron_to_hf(ckpt, f"{root}/{name}_back")
    out["trainer_format"] = _trainer_format_round_trip(root, refs)
    out["reports"]["llama_bf16"] = convert_hf_to_megatron(f"{root}/llama_bf16_hf", f"{root}/llama_bf16_mg")
    convert_megatron_to_hf(f"{root}/llama_bf16_mg", f"{root}/llama_bf16_back")
    out["errors"] = _error_cases(root, models)
    if "smollm2" in models:  # the CLI end to end, in this process (it tears the process group down last)
        import runpy

        score = runpy.run_path(str(ROOT / "tools" / "score.py"))["main"]
        score(["--ckpt", f"{root}/smollm2_mg", "--data", refs["score_input"], "--out", f"{root}/scores_tp1.jsonl"])
    return out


def _trainer_format_round_trip(root: str, refs: dict[str, Any]) -> float:
    """A model built from the checkpoint's own config loads the converter's output (what the
    trainer's init_from does), and the exporter reads it back after a re-save. Returns the max
    logits difference after the load."""
    from psft_megatron.checkpoint.model_checkpoint import (
        load_model_checkpoint,
        model_config_of,
        read_meta,
        save_model_checkpoint,
    )
    from psft_megatron.conversion.megatron_to_hf import convert_megatron_to_hf
    from psft_megatron.model.build import build_model
    from psft_megatron.model.forward import gather_logits, pipeline_forward

    cfg = model_config_of(read_meta(f"{root}/llama_mg"))
    built = build_model(cfg)
    load_model_checkpoint(built.chunks, f"{root}/llama_mg")
    ids = refs["llama"]["ids"]
    logits = pipeline_forward(built.chunks, [{"input_ids": ids}], lambda lg, mb: gather_logits(lg, cfg.vocab_size))[0]
    save_model_checkpoint(built.chunks, f"{root}/llama_trainer", {"model": cfg, "step": 3})
    convert_megatron_to_hf(f"{root}/llama_trainer", f"{root}/llama_trainer_hf")
    return float((logits - refs["llama"]["logits"]).abs().max())


def _error_cases(root: str, models: dict[str, str]) -> dict[str, str]:
    from safetensors.torch import load_file, save_file

    from psft_megatron.checkpoint.model_checkpoint import (
        load_model_checkpoint,
        read_meta,
    )
    from psft_megatron.conversion.hf_to_megatron import convert_hf_to_megatron
    from psft_megatron.conversion.megatron_to_hf import convert_megatron_to_hf
    from psft_megatron.model.build import build_model
    from psft_megatron.model.config import ModelConfig

    src = Path(models["qwen2"])
    errors = {}

    def variant(tag: str, config_edit: dict | None = None, tensors_edit: Any = None) -> str:
        folder = Path(root) / f"bad_{tag}"
        shutil.copytree(src, folder)
        if config_edit:
            cfg = json.loads((folder / "config.json").read_text())
            cfg.update(config_edit)
            (folder / "config.json").write_text(json.dumps(cfg))
        if tensors_edit:
            sd = load_file(folder / "model.safetensors")
            tensors_edit(sd)
            save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
        out = Path(root) / f"bad_{tag}_mg"
        errors[tag] = _expect_failure(convert_hf_to_megatron, folder, out)
        errors[tag + "_leftover"] = str(sorted(p.name for p in Path(root).glob(f"bad_{tag}_mg*")))
        return errors[tag]

    variant("arch", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    variant("missing", tensors_edit=lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    variant("unexpected", tensors_edit=lambda sd: sd.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2)))
    variant("shape", {"intermediate_size": 128})
    errors["exists"] = _expect_failure(convert_hf_to_megatron, src, Path(root) / "qwen2_mg")

    # A checkpoint whose tensors do not fit the config it claims (e.g. from another model).
    wrong = Path(root) / "wrong_meta_mg"
    shutil.copytree(Path(root) / "qwen2_mg", wrong)
    meta = read_meta(wrong)
    meta["model"]["ffn_hidden_size"] = 128
    (wrong / "psft_meta.json").write_text(json.dumps(meta))
    errors["export_mismatch"] = _expect_failure(convert_megatron_to_hf, wrong, Path(root) / "wrong_hf")
    errors["export_mismatch_leftover"] = str(sorted(p.name for p in Path(root).glob("wrong_hf*")))
    built = build_model(ModelConfig.from_dict(dict(meta["model"], num_layers=2, params_dtype="fp32")))
    errors["load_other_arch"] = _expect_failure(load_model_checkpoint, built.chunks, Path(root) / "qwen2_mg")
    return errors


def tp2_pp2_worker(root: str, models: dict[str, str], refs: dict[str, Any]) -> dict[str, Any]:
    from psft_megatron.checkpoint.model_checkpoint import (
        load_model_checkpoint,
        read_meta,
        save_model_checkpoint,
    )
    from psft_megatron.evaluation.response_nll import score_file
    from psft_megatron.model.build import build_model
    from psft_megatron.model.config import ModelConfig
    from psft_megatron.runtime.config import ParallelConfig
    from psft_megatron.runtime.distributed import init_model_parallel, set_seed

    out: dict[str, Any] = {"tp2": {}, "pp2": {}}
    tp2 = ParallelConfig(tensor_model_parallel_size=2)
    for name in TINY:
        # megatron's MoE layer refuses TP without SP (ids are 24 tokens: SP splits them evenly).
        par = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True) if name == "qwen3_moe" else tp2
        logits = _megatron_logits(f"{root}/{name}_mg", par, refs[name]["ids"])
        out["tp2"][name] = float((logits - refs[name]["logits"]).abs().max())
    # Expert parallelism: each rank holds 2 of the 4 experts and runs the same rows (DP=2 for the rest).
    logits = _megatron_logits(f"{root}/qwen3_moe_mg", ParallelConfig(expert_model_parallel_size=2),
                              refs["qwen3_moe"]["ids"])
    out["ep2"] = float((logits - refs["qwen3_moe"]["logits"]).abs().max())
    # A trainer-style save at TP=2 (bf16 model, as training would hold it) for the export test.
    init_model_parallel(tp2)
    set_seed(0)
    meta = read_meta(f"{root}/qwen2_mg")
    built = build_model(ModelConfig.from_dict(dict(meta["model"], params_dtype="fp32")), tp2)
    load_model_checkpoint(built.chunks, f"{root}/qwen2_mg")
    save_model_checkpoint(built.chunks, f"{root}/qwen2_tp2", {"model": meta["model"], "step": 7},
                          hf_config=f"{root}/qwen2_mg/hf_config.json")

    pp2 = ParallelConfig(pipeline_model_parallel_size=2)
    for name in models:
        logits = _megatron_logits(f"{root}/{name}_mg", pp2, refs[name]["ids"])
        if logits is not None:
            out["pp2"][name] = float((logits - refs[name]["logits"]).abs().max())
    # Interleaved pipeline: 2 stages x 2 virtual chunks of one layer each, 2 microbatches.
    vp = ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    ids = refs["llama"]["ids"]
    logits = _megatron_logits(f"{root}/llama_mg", vp, ids, microbatches=2)
    if logits is not None:
        out["vp2"] = float((torch.cat(logits) - refs["llama"]["logits"]).abs().max())
    if "smollm2" in models:
        # SmolLM2 ties its embeddings: at PP=2 this needs cpu_compat's LanguageModule route.
        score_file(f"{root}/smollm2_mg", refs["score_input"], f"{root}/scores_pp2.jsonl", parallel=pp2,
                   batch_size=2)
    return out


# --------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def tp1(work) -> dict[str, Any]:
    return run_in_processes(tp1_worker, 1, timeout=300,
                            kwargs=dict(root=work["root"], models=work["models"], refs=work["refs"]))[0]


@pytest.fixture(scope="module")
def tp2_pp2(work, tp1) -> list[dict[str, Any]]:
    return run_in_processes(tp2_pp2_worker, 2, timeout=300,
                            kwargs=dict(root=work["root"], models=work["models"], refs=work["refs"]))


def test_checkpoint_layout(work, tp1):
    root = Path(work["root"])
    for name in work["models"]:
        ckpt = root / f"{name}_mg"
        names = sorted(p.name for p in ckpt.iterdir())
        assert names[:3] == ["hf_config.json", "model", "psft_meta.json"] and names[3:] in ([], ["tokenizer"])
        assert (ckpt / "model" / "metadata.json").is_file() and not (root / f"{name}_mg.partial").exists()
        meta = json.loads((ckpt / "psft_meta.json").read_text())
        assert meta["format"] == "psft-megatron" and meta["format_version"] == 1 and meta["dtype"] == "float32"
    assert tp1["reports"]["qwen2"]["padded_vocab_size"] == 1152
    if "smollm2" in work["models"]:
        assert (root / "smollm2_mg" / "tokenizer" / "tokenizer.json").is_file()


def test_tp1_logits_match_transformers(work, tp1):
    assert set(tp1["diff"]) == set(work["models"])
    print("TP=1 max |logits - transformers|:", tp1["diff"])
    for name, diff in tp1["diff"].items():
        assert diff <= TOL, (name, diff)


def test_hf_megatron_hf_is_bit_exact(work, tp1):
    from transformers import AutoModelForCausalLM

    root = Path(work["root"])
    for name, src in work["models"].items():
        original, back = _hf_state(Path(src)), _hf_state(root / f"{name}_back")
        if work["hf"].get(name) is not None and work["hf"][name].config.tie_word_embeddings:
            original.pop("lm_head.weight", None)
        assert sorted(original) == sorted(back), name
        for k, v in original.items():
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), (name, k)
        assert (root / f"{name}_back" / "model.safetensors.index.json").is_file()
    original, back = _hf_state(root / "llama_bf16_hf"), _hf_state(root / "llama_bf16_back")
    assert tp1["reports"]["llama_bf16"]["dtype"] == "torch.bfloat16" and sorted(original) == sorted(back)
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], v) for k, v in original.items())
    assert json.loads((root / "llama_bf16_back" / "config.json").read_text()).get("dtype") == "bfloat16"
    # transformers reloads the exports (config.json and weights) to the same logits, bit for bit.
    for name in ("qwen2", "qwen3", "qwen3_moe"):
        extra = {"experts_implementation": "eager"} if name == "qwen3_moe" else {}
        reloaded = AutoModelForCausalLM.from_pretrained(root / f"{name}_back", attn_implementation="eager",
                                                        **extra).eval()
        assert type(reloaded).__name__ == type(work["hf"][name]).__name__, name
        assert torch.equal(_logits(reloaded, work["refs"][name]["ids"]), work["refs"][name]["logits"]), name


def test_trainer_checkpoint_code_reads_and_writes_the_same_layout(work, tp1):
    root = Path(work["root"])
    assert tp1["trainer_format"] <= TOL
    original, back = _hf_state(Path(work["models"]["llama"])), _hf_state(root / "llama_trainer_hf")
    assert sorted(original) == sorted(back) and all(torch.equal(original[k], back[k]) for k in original)
    # The trainer stores no hf_config.json: the exporter writes a config transformers reads.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "llama_trainer_hf", attn_implementation="eager").eval()
    assert torch.equal(_logits(model, work["refs"]["llama"]["ids"]), work["refs"]["llama"]["logits"])


def test_errors_are_clear_and_leave_no_output(tp1):
    e = tp1["errors"]
    assert "unsupported architecture" in e["arch"] and "gpt2" in e["arch"]
    assert "missing tensors (1): ['model.layers.1.mlp.up_proj.weight']" in e["missing"]
    assert "unexpected tensors (1): ['model.layers.0.mlp.extra.weight']" in e["unexpected"]
    assert "shape mismatches" in e["shape"] and "gate_proj.weight: expected (128, 64), found (96, 64)" in e["shape"]
    for tag in ("arch", "missing", "unexpected", "shape"):
        assert e[f"{tag}_leftover"] == "[]", (tag, e[f"{tag}_leftover"])
    assert "FileExistsError" in e["exists"]
    assert "does not match the model config" in e["export_mismatch"] and "linear_fc1" in e["export_mismatch"]
    assert e["export_mismatch_leftover"] == "[]"
    assert "num_layers: checkpoint 4, model 2" in e["load_other_arch"]


def test_tp2_and_pp2_logits_match_transformers(work, tp2_pp2):
    print("TP=2:", tp2_pp2[0]["tp2"], "PP=2:", tp2_pp2[1]["pp2"], "PP=2 x VP=2:", tp2_pp2[1]["vp2"],
          "EP=2:", [r["ep2"] for r in tp2_pp2])
    for rank in tp2_pp2:
        assert set(rank["tp2"]) == set(TINY)
        for name, diff in rank["tp2"].items():
            assert diff <= TOL, ("tp2", name, diff)
    last = tp2_pp2[1]["pp2"]
    assert set(last) == set(work["models"]) and not tp2_pp2[0]["pp2"]
    for name, diff in last.items():
        assert diff <= TOL, ("pp2", name, diff)
    assert tp2_pp2[1]["vp2"] <= TOL and "vp2" not in tp2_pp2[0]
    assert all(rank["ep2"] <= TOL for rank in tp2_pp2)  # the MoE model at EP=2, on both ranks


def test_score_matches_transformers_nll(work, tp1, tp2_pp2):
    if "smollm2" not in work["models"]:
        pytest.skip("SmolLM2 GGUF not available in ../shared")
    root = Path(work["root"])
    expected = work["refs"]["smollm2"]["nll"]
    for out in ("scores_tp1.jsonl", "scores_pp2.jsonl"):
        rows = [json.loads(line) for line in open(root / out)]
        assert [r["index"] for r in rows] == [0, 1, 2] and rows[0]["id"] == "gsm8k-0"
        print(out, [(r["nll"], ref) for r, ref in zip(rows, expected)])
        for row, ref in zip(rows, expected):
            assert abs(row["nll"] - ref) <= TOL, (out, row, ref)
            assert row["num_tokens"] > 10 and not row["truncated"]


def test_export_of_a_tp2_saved_checkpoint_via_cli(work, tp2_pp2):
    from transformers import AutoModelForCausalLM

    root = Path(work["root"])
    meta = json.loads((root / "qwen2_tp2" / "psft_meta.json").read_text())
    assert meta["saved_layout"]["tp"] == 2 and meta["step"] == 7
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "tools" / "convert_megatron_to_hf.py"), "--ckpt", str(root / "qwen2_tp2"),
           "--out", str(root / "qwen2_tp2_hf"), "--max-shard-size-gb", "0.0001"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(list((root / "qwen2_tp2_hf").glob("model-*.safetensors"))) > 1  # sharded
    original, back = _hf_state(Path(work["models"]["qwen2"])), _hf_state(root / "qwen2_tp2_hf")
    assert sorted(original) == sorted(back)
    assert all(torch.equal(original[k], back[k]) for k in original)
    model = AutoModelForCausalLM.from_pretrained(root / "qwen2_tp2_hf", attn_implementation="eager").eval()
    assert torch.equal(_logits(model, work["refs"]["qwen2"]["ids"]), work["refs"]["qwen2"]["logits"])

    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_megatron_to_hf.py"), "--ckpt",
                          str(root / "qwen2_hf"), "--out", str(root / "nowhere")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a psft_megatron model checkpoint" in bad.stderr
    assert not (root / "nowhere").exists()

"""Experiment trackers and HF copies at save, through the real entry point (issue #25 parts 1 and 2).

One run of the tiny recipe at TP=2 (2 torchrun-like ranks of ``launch/pretrain_psft.py``), in two
launches, with W&B (``WANDB_MODE=offline``) and MLflow (a local file store) on and
``checkpoint.save_hf: 1``:

1. steps 1-8 (``exit_after_steps``), with ``checkpoint.save_hf_dir`` under a regular file, so each
   HF export fails for real (its folder cannot be created);
2. the relaunch resumes from step 8 and runs to step 16 with HF copies beside the checkpoints.

What is read back is what the tools themselves read: the offline ``.wandb`` files through W&B's
own reader (``wandb leet inspect --json``), the MLflow store through ``MlflowClient``, the HF copy
through ``transformers``, the Megatron checkpoint through ``torch.distributed.checkpoint``, and
each is compared with ``metrics.jsonl`` / ``config.yaml``. The launches run under ``strace`` (when
it is installed and allowed) so that every ``connect()`` of every process they start (the ranks,
wandb-core, the exporter) is checked: nothing may leave the machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import yaml

from psft_megatron.testing.multiproc import free_port
from psft_megatron.testing.recipes import tiny_recipe

pytestmark = pytest.mark.slow  # starts processes

# The trackers are optional extras (.[wandb], .[mlflow]; the README's test command installs both):
# the launches turn on the ones installed, and the tests of one that is not skip.
HAVE_WANDB = importlib.util.find_spec("wandb") is not None
HAVE_MLFLOW = importlib.util.find_spec("mlflow") is not None
needs_wandb = pytest.mark.skipif(not HAVE_WANDB, reason='wandb is not installed (pip install -e ".[wandb]")')
needs_mlflow = pytest.mark.skipif(not HAVE_MLFLOW, reason='mlflow is not installed (pip install -e ".[mlflow]")')

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "launch" / "pretrain_psft.py"
STEPS, STOP_AT, SAVE_INTERVAL, EVAL_INTERVAL = 16, 8, 4, 4
NPROC = 2
# Anything that tries HTTP(S) goes to this closed local port instead of the network: a connect() to
# it is an attempt to reach the network, and the strace check below counts it as one.
BLACKHOLE = ("127.0.0.1", 9)
OFFLINE_ENV = {
    "WANDB_MODE": "offline",
    **{k: f"http://{BLACKHOLE[0]}:{BLACKHOLE[1]}" for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                                                              "http_proxy", "https_proxy", "all_proxy")},
    "NO_PROXY": "", "no_proxy": "",
    "GLOO_SOCKET_IFNAME": "lo",  # gloo on the loopback: its connects are local by construction
}


# Every connect() and every datagram sent (a DNS query's name is in it), strings in hex (-xx).
STRACE = ["-f", "--seccomp-bpf", "-qq", "-xx", "-s", "300", "-e", "trace=connect,sendto,sendmmsg"]


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    probe = subprocess.run(["strace", *STRACE, "-o", os.devnull, "true"],
                           capture_output=True)
    return probe.returncode == 0  # ptrace may be refused in a container


def _launch(recipe: Path, trace_dir: Path | None, tag: str, overrides: list[str]) -> list[tuple[int, str]]:
    """Run the entry point as ``NPROC`` torchrun-like ranks; (exit status, output) of each."""
    port = str(free_port())
    procs = []
    for rank in range(NPROC):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(NPROC), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1", **OFFLINE_ENV)
        command = [sys.executable, str(LAUNCHER), str(recipe), *overrides]
        if trace_dir is not None:  # every connect() of this rank and of every process it starts
            command = ["strace", *STRACE, "-e", "signal=none",
                       "-o", str(trace_dir / f"{tag}.rank{rank}.trace"), *command]
        log = open(recipe.parent / f"{tag}.rank{rank}.log", "w+")
        procs.append((subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                       cwd=recipe.parent, start_new_session=True), log))
    out = []
    try:
        for p, log in procs:
            p.wait(timeout=420)
            log.seek(0)
            out.append((p.returncode, log.read()))
    finally:
        for p, log in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
            log.close()
    return out


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("companions")
    (tmp / "blocked").write_text("a regular file: no folder can be made under it\n")
    run_dir = tmp / "run"
    recipe = tiny_recipe(
        tiny_data, run_dir,
        parallel={"tensor_model_parallel_size": 2},
        training={"train_steps": STEPS, "eval_interval": EVAL_INTERVAL, "eval_rows": 4},
        checkpoint={"save_interval": SAVE_INTERVAL, "keep_last": 1, "save_at_end": True, "save_hf": 1},
        logging={**({"wandb": {"project": "psft-tests", "tags": ["companions"]}} if HAVE_WANDB else {}),
                 **({"mlflow": {"tracking_uri": f"file:{tmp / 'mlruns'}", "experiment": "psft-tests"}}
                    if HAVE_MLFLOW else {})},
    )
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    trace_dir = tmp if _strace_works() else None
    first = _launch(path, trace_dir, "first", [f"training.exit_after_steps={STOP_AT}",
                                               f"checkpoint.save_hf_dir={tmp / 'blocked' / 'hf'}"])
    status_first = json.loads((run_dir / "run_status.json").read_text())
    wandb_id_first = (run_dir / "wandb_run_id").read_text().strip() if HAVE_WANDB else None
    mlflow_id_first = (run_dir / "mlflow_run_id").read_text().strip() if HAVE_MLFLOW else None
    config_first = yaml.safe_load((run_dir / "config.yaml").read_text())
    checkpoints_first = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    second = _launch(path, trace_dir, "second", [])
    return {"tmp": tmp, "run_dir": run_dir, "first": first, "second": second, "status_first": status_first,
            "wandb_id_first": wandb_id_first, "mlflow_id_first": mlflow_id_first, "config_first": config_first,
            "checkpoints_first": checkpoints_first, "traced": trace_dir is not None}


def _rank0(out: list[tuple[int, str]]) -> str:
    return out[0][1]


def _records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "split" not in r], [r for r in rows if r.get("split") == "eval"]


# -- the launches -------------------------------------------------------------------------------


def test_both_launches_succeed_and_the_second_resumes_from_the_first(run):
    for name in ("first", "second"):
        for code, output in run[name]:
            assert code == 0, output[-4000:]
    assert run["status_first"]["status"] == "stopped" and run["status_first"]["step"] == STOP_AT
    assert json.loads((run["run_dir"] / "run_status.json").read_text())["status"] == "finished"
    assert f"resumed from {run['run_dir'] / 'checkpoints' / 'step_000008'}" in _rank0(run["second"])
    train, _ = _records(run["run_dir"])
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))


# -- HF copies ----------------------------------------------------------------------------------


def test_a_failed_export_is_a_warning_and_the_checkpoint_survives(run):
    """Launch 1's exports fail for real (their folder cannot be made); its checkpoints are intact, it
    trains on after each failure, and the relaunch resumes from the checkpoint whose export failed."""
    log = _rank0(run["first"])
    blocked = run["tmp"] / "blocked"
    for step in (4, 8):
        line = next((x for x in log.splitlines() if f"HF copy of step {step} to" in x), "")
        assert "failed" in line and f"{blocked} is a file, not a folder" in line, log[-4000:]
        assert "the checkpoint itself is intact" in line
    # Training went on after the first failure: launch 1 saved step 8 after step 4's export had failed.
    assert log.index("HF copy of step 4 to") < log.index(f"saved checkpoint {run['run_dir'] / 'checkpoints' / 'step_000008'}")
    assert run["checkpoints_first"] == ["latest", "step_000008"]  # no HF copy, nothing half-written
    assert not list(run["tmp"].glob("**/step_00000[48]_hf*"))
    # The relaunch resumed from step 8 (test above) - a checkpoint that must have been complete then.
    assert "cannot resume" not in _rank0(run["second"])


def test_hf_copies_are_exported_in_the_background_and_pruned_with_their_checkpoint(run):
    """keep_last: 1 - after the save at 16, checkpoint 12 goes and its HF copy with it. Step 12's
    export overlapped training: it ran longer than the next save waited for it."""
    log = _rank0(run["second"])
    assert "HF copy of step_000012: exporting to" in log, log[-4000:]
    took = float(re.search(r"HF copy of step 12 written to \S+ in ([\d.]+) s", log).group(1))
    waited = re.search(r"waited ([\d.]+) s for the HF copy of step_000012 before the next save", log)
    overlap = took - (float(waited.group(1)) if waited else 0.0)
    assert overlap > 0.5, f"the export ran {took} s and the save waited {waited and waited.group(1)} s for it"
    assert "HF copy of step 16 written to" in log  # the end of the launch waited for the last one
    ckpts = run["run_dir"] / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000016", "step_000016_hf"]
    assert all("HF copy" not in output for _, output in run["second"][1:])  # rank 0 only


def _megatron_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a Megatron checkpoint, read straight from its dist-checkpoint files
    (every tensor the metadata lists, allocated at its stored shape and dtype, then loaded)."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(ckpt / "model"))
    stored = reader.read_metadata().state_dict_metadata
    sd = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in stored.items()
          if isinstance(m, TensorStorageMetadata)}
    load(sd, storage_reader=reader, no_dist=True)
    return sd


def test_the_hf_copy_loads_in_transformers_with_the_checkpoints_weights(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpts = run["run_dir"] / "checkpoints"
    hf = ckpts / "step_000016_hf"
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    got = model.state_dict()
    ref = _megatron_tensors(ckpts / "step_000016")
    vocab = model.config.vocab_size
    assert torch.equal(got["model.embed_tokens.weight"], ref["embedding.word_embeddings.weight"][:vocab])
    assert torch.equal(got["lm_head.weight"], ref["output_layer.weight"][:vocab])
    assert torch.equal(got["model.norm.weight"], ref["decoder.final_layernorm.weight"])
    for i in range(model.config.num_hidden_layers):
        assert torch.equal(got[f"model.layers.{i}.mlp.down_proj.weight"], ref["decoder.layers.mlp.linear_fc2.weight"][i])
    ids = tokenizer("What is 2 plus 3?", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


# -- W&B ------------------------------------------------------------------------------------------


def _wandb_records(path: Path) -> list[dict]:
    """Every record of an offline ``.wandb`` file, read by W&B's own reader."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, **OFFLINE_ENV))
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def _wandb_launches(run_dir: Path) -> list[list[dict]]:
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    return [_wandb_records(f) for f in files]


def _same(got: Any, want: Any, where: str) -> None:
    if isinstance(want, float) and isinstance(got, (int, float)):
        assert got == pytest.approx(want, rel=0, abs=0) or (want != want and got != got), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@needs_wandb
def test_wandb_offline_run_holds_metrics_jsonl_config_plan_and_status(run):
    run_dir = run["run_dir"]
    launches = _wandb_launches(run_dir)
    # One rank logs: one offline run per launch, not one per rank.
    assert len(launches) == 2, [len(x) for x in launches]
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert run_id == run["wandb_id_first"]
    history: dict[int, dict] = {}
    for records, config in zip(launches, (run["config_first"], yaml.safe_load((run_dir / "config.yaml").read_text()))):
        head = next(r["run"] for r in records if r["type"] == "run")
        assert head["run_id"] == run_id and head["project"] == "psft-tests" and head["tags"] == ["companions"]
        got_config = {k: v for k, v in head["config"]["update"].items() if k != "_wandb"}
        assert got_config == config  # the launch's resolved recipe, as config.yaml holds it
        for r in records:
            if r["type"] == "history":
                step = r["history"]["step"]["num"]
                assert step not in history, f"step {step} logged twice"
                history[step] = r["history"]["item"]
    train, evals = _records(run_dir)
    assert sorted(s for s in history if s > 0) == [r["step"] for r in train]
    for rec in train:
        row = history[rec["step"]]
        for key, value in rec.items():
            if key != "step":
                _same(row[key], value, f"step {rec['step']} {key}")
    for rec in evals:
        row = history[rec["step"]]
        for key, value in rec.items():
            if key not in ("step", "split"):
                _same(row[f"eval/{key}"], value, f"eval step {rec['step']} {key}")
    # Status and plan, from each launch's summary updates.
    for records, status, code in zip(launches, ("stopped", "finished"), (0, 0)):
        summary: dict[str, Any] = {}
        for r in records:
            if r["type"] == "summary":
                summary.update(r["summary"]["update"])
        assert summary["run_status"] == status
        assert summary["plan/world_size"] == NPROC and summary["plan/layout"].startswith("TP2 ")
        assert summary["plan/report"].startswith("plan: ")
        assert next(r for r in records if r["type"] == "exit")["exit"].get("exit_code", 0) == code


# -- MLflow ---------------------------------------------------------------------------------------


def _mlflow_client(tmp: Path):
    from mlflow import MlflowClient

    with mock.patch.dict(os.environ, {"MLFLOW_ALLOW_FILE_STORE": "true"}):
        return MlflowClient(tracking_uri=f"file:{tmp / 'mlruns'}")


@needs_mlflow
def test_mlflow_run_holds_metrics_jsonl_config_plan_and_status(run):
    from psft_megatron.training.trackers.base import flatten

    run_dir = run["run_dir"]
    client = _mlflow_client(run["tmp"])
    experiment = client.get_experiment_by_name("psft-tests")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the relaunch continued the run; one rank logged
    run_id = runs[0].info.run_id
    assert run_id == run["mlflow_id_first"] == (run_dir / "mlflow_run_id").read_text().strip()
    info = client.get_run(run_id)
    assert info.info.status == "FINISHED" and info.data.tags["run_status"] == "finished"
    assert info.data.tags["plan.world_size"] == str(NPROC) and info.data.tags["plan.layout"].startswith("TP2 ")
    assert info.data.params == {k: str(v) for k, v in flatten(run["config_first"]).items()}
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "plan.txt"} <= artifacts
    train, evals = _records(run_dir)
    for key in train[0]:
        if key in ("step", "phase"):
            continue
        history = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert sorted(history) == [r["step"] for r in train], key
        for rec in train:
            _same(history[rec["step"]], float(rec[key]), f"step {rec['step']} {key}")
    for key in ("loss", "entropy", "mean_logp", "tokens"):
        history = {m.step: m.value for m in client.get_metric_history(run_id, f"eval/{key}")}
        assert history == {r["step"]: float(r[key]) for r in evals}, key
    assert info.data.tags["phase"] == train[-1]["phase"]


# -- nothing reaches the network ------------------------------------------------------------------

_SYSCALL = re.compile(r"^(\d+)\s+(.*)$")
_HEX = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')
_CONNECT = re.compile(r"^connect\((\d+), \{sa_family=(AF_\w+)(.*?)\}, \d+\)")
_SEND = re.compile(r"^(?:sendto|sendmmsg)\((\d+), (.*)$")


def _syscalls(trace: str) -> list[tuple[str, str]]:
    """(thread id, whole call) for each traced call, with strace's split ``<unfinished ...>`` /
    ``<... resumed>`` halves joined."""
    calls, pending = [], {}
    for line in trace.splitlines():
        m = _SYSCALL.match(line)
        if not m:
            continue
        tid, text = m.groups()
        if text.endswith("<unfinished ...>"):
            pending[tid] = text[: -len("<unfinished ...>")].rstrip()
            continue
        resumed = re.match(r"<\.\.\. \w+ resumed>(.*)$", text)
        if resumed:
            text = pending.pop(tid, "") + resumed.group(1)
        calls.append((tid, text))
    return calls


def _unhex(s: str) -> bytes:
    return bytes.fromhex(s.replace("\\x", ""))


def _dns_name(query: bytes) -> str | None:
    """The name a DNS query asks about (None if ``query`` is not one)."""
    labels, i = [], 12  # after the 12-byte header
    while i < len(query) and query[i]:
        n = query[i]
        labels.append(query[i + 1:i + 1 + n].decode("ascii", "replace"))
        i += 1 + n
    return ".".join(labels).lower() if len(query) > 12 and i < len(query) else None


def _local_name(name: str) -> bool:
    """This machine's own names: its loopback addresses looked up in reverse (torch.distributed's
    TCPStore asks the resolver who 127.0.0.1 is), ``localhost`` and its host name."""
    host = socket.gethostname().lower()
    return (name.endswith(".127.in-addr.arpa") or name == "1." + "0." * 31 + "ip6.arpa"
            or name in ("localhost", host) or name.startswith(host + "."))


def _network_use(trace: str) -> tuple[list[str], int, list[str]]:
    """(calls that reach beyond this machine, loopback TCP/UDP connects, names asked of the resolver).

    A connect() to anything but a loopback address is one, except a DNS server's port 53: a lookup
    of this machine's own names (:func:`_local_name`) is answered about this machine and is allowed;
    a query for any other name (a tracker's server) is a call that reaches beyond. A connect() to the
    ``BLACKHOLE`` port (where the proxies point) is an attempt too."""
    beyond, local, names = [], 0, []
    dns_sockets: set[tuple[str, str]] = set()
    for tid, call in _syscalls(trace):
        c = _CONNECT.match(call)
        if c:
            fd, family, rest = c.groups()
            dns_sockets.discard((tid, fd))
            if family in ("AF_UNIX", "AF_NETLINK", "AF_UNSPEC"):
                continue
            port = re.search(r"port=htons\((\d+)\)", rest)
            addr = _HEX.search(rest)
            host = _unhex(addr.group(1)).decode("ascii", "replace") if addr else "?"
            port_no = int(port.group(1)) if port else -1
            if (host, port_no) == BLACKHOLE:
                beyond.append(call)
            elif host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1") or host.startswith("::ffff:127."):
                local += 1
            elif port_no == 53:
                dns_sockets.add((tid, fd))
            else:
                beyond.append(call)
            continue
        m = _SEND.match(call)
        if m and (tid, m.group(1)) in dns_sockets:
            for payload in _HEX.findall(m.group(2)):
                name = _dns_name(_unhex(payload))
                if name is not None:
                    names.append(name)
                    if not _local_name(name):
                        beyond.append(f"a DNS query for {name}: {call[:120]}")
    return beyond, local, names


def test_nothing_reaches_the_network(run):
    """Every process of both launches (the ranks, wandb-core, the HF exporter), traced: no connection
    beyond this machine, no name looked up but its own, nothing sent where the proxies point."""
    if not run["traced"]:
        pytest.skip("strace is not installed or not allowed here: the connect() check needs it")
    traces = sorted(run["tmp"].glob("*.trace"))
    assert len(traces) == 2 * NPROC
    beyond, local, names = [], 0, []
    for trace in traces:
        b, n, q = _network_use(trace.read_text())
        beyond += [f"{trace.name}: {x}" for x in b]
        local += n
        names += q
    assert local > 0, "no loopback connect traced at all: the trace is not seeing the ranks"
    assert not beyond, "\n".join(beyond[:20])
    assert all(_local_name(n) for n in names), names


def _query(name: str) -> str:
    """A DNS query for ``name`` as strace -xx prints it."""
    labels = b"".join(bytes([len(x)]) + x.encode() for x in name.split("."))
    return "".join(f"\\x{b:02x}" for b in b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + labels + b"\x00\x00\x01\x00\x01")


def _hex(text: str) -> str:
    return "".join(f"\\x{b:02x}" for b in text.encode())


def test_the_network_check_flags_remote_addresses_and_foreign_lookups():
    """The trace reader above flags what it must (so the test above can fail)."""
    ns, lo = _hex("10.255.255.53"), _hex("127.0.0.1")
    trace = "\n".join([
        f'12 connect(4, {{sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("{ns}")}}, 16) = 0',
        f'12 sendto(4, "{_query("1.0.0.127.in-addr.arpa")}", 40, MSG_NOSIGNAL, NULL, 0) = 40',
        f'12 connect(4, {{sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr("{ns}")}}, 16) = 0',
        f'12 sendmmsg(4, [{{msg_hdr={{msg_iov=[{{iov_base="{_query("api.wandb.ai")}", iov_len=30}}]}}}}, '
        f'{{msg_hdr={{msg_iov=[{{iov_base="{_query("api.wandb.ai")}", iov_len=30}}]}}}}], 2, MSG_NOSIGNAL) = 2',
        f'13 connect(5, {{sa_family=AF_INET, sin_port=htons(443), sin_addr=inet_addr("{_hex("35.186.1.2")}")}}, 16) = 0',
        f'13 connect(3, {{sa_family=AF_INET, sin_port=htons(9), sin_addr=inet_addr("{lo}")}}, 16) = -1',
        f'13 connect(6, {{sa_family=AF_INET, sin_port=htons(29500), sin_addr=inet_addr("{lo}")}}, 16) = 0',
        f'13 connect(7, {{sa_family=AF_INET6, sin6_port=htons(29500), inet_pton(AF_INET6, "{_hex("::1")}", '
        '&sin6_addr)}, 28 <unfinished ...>',
        '13 <... connect resumed>) = 0',
        f'14 connect(8, {{sa_family=AF_UNIX, sun_path="{_hex("/tmp/x")}"}}, 110) = 0',
    ])
    beyond, local, names = _network_use(trace)
    assert names == ["1.0.0.127.in-addr.arpa", "api.wandb.ai", "api.wandb.ai"]
    assert len(beyond) == 4, beyond
    assert "api.wandb.ai" in beyond[0] and "api.wandb.ai" in beyond[1]
    assert _hex("35.186.1.2") in beyond[2] and "htons(9)" in beyond[3]
    assert local == 2

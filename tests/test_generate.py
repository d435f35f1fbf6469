"""The teacher stage with real vLLM (CPU build) on a micro teacher, through the `distill` command."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from distill.store import LOGPROB_MAX_ERROR, TeacherStore

from .conftest import MICRO, TEACHER, TINY, kill_tree, run_cli, teacher_of

SAMPLE = [
    "generate.mode=sample",
    "generate.num_sequences=24",
    "generate.items_per_shard=2",
    "generate.samples_per_prompt=2",
    "generate.max_new_tokens=12",
    "generate.top_k=16",
    "generate.temperature=1.0",
]


def argv(*args, runs):
    if args and args[0] == "generate":  # the micro settings first, so the test's own overrides win
        return [*args[:2], *MICRO, *TEACHER, f"runs_dir={runs}", *args[2:]]
    return list(args)


def distill(*args, runs):
    cmd = [sys.executable, "-m", "distill", *argv(*args, runs=runs)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def cli(*args, runs):
    """The same command through the CLI's main in this process (refusals and the HF backend)."""
    return run_cli(*argv(*args, runs=runs))


def rows(path):
    return {c.id: c for c in TeacherStore(path).rows()}


def shard_hashes(path):
    return {name: entry["sha256"] for name, entry in TeacherStore(path).shards.items()}


@pytest.fixture(scope="module", autouse=True)
def kept_engine():
    """The module's in-process commands share the teacher's engine while their engine arguments agree
    (distill.vllm.engine.kept_engines, as `distill run` does for its two stores); the SIGTERM test's
    process starts its own."""
    from distill.vllm.engine import kept_engines

    with kept_engines():
        yield


@pytest.fixture(scope="module")
def reference(cache_dir, tmp_path_factory):
    """An uninterrupted, unsharded sample-mode store."""
    runs = tmp_path_factory.mktemp("reference")
    out = cli("generate", str(TINY), *SAMPLE, runs=runs)
    assert out.returncode == 0, out.stderr[-3000:]
    return runs / "tiny" / "teacher"


@pytest.mark.slow
def test_sample_mode_captures_each_completion_token(reference):
    store = TeacherStore(reference)
    store.verify()
    summary = store.summary()
    assert summary["rows"] == 48 and summary["complete"] and summary["shards"] == "12 of 12"
    captures = rows(reference)
    source = Path(store.manifest["made_from"]["source"])
    prompts = [json.loads(line) for line in source.read_text().splitlines()][:24]
    for p in prompts:
        a, b = captures[f"{p['id']}-s0"], captures[f"{p['id']}-s1"]
        assert a.input_ids[: a.start + 1] == b.input_ids[: b.start + 1]  # the same prompt
        assert 0 < a.num_positions <= 12
    assert any(captures[f"{p['id']}-s0"].input_ids != captures[f"{p['id']}-s1"].input_ids for p in prompts)
    inside = 0
    for c in captures.values():
        assert c.topk_ids.shape == (c.num_positions, 16)
        assert np.all(np.diff(c.topk_logprobs, axis=1) <= 1e-6)  # placed by rank
        for i in range(c.num_positions):
            token = c.input_ids[c.start + 1 + i]
            hit = np.nonzero(c.topk_ids[i] == token)[0]
            if hit.size:  # the sampled token's own logprob agrees with its top-k entry
                inside += 1
                assert abs(c.topk_logprobs[i, hit[0]] - c.token_logprobs[i]) <= LOGPROB_MAX_ERROR + 5e-3
    assert inside > 0


@pytest.mark.slow
def test_hundreds_of_seeded_prompts_in_one_engine_call(reference, tmp_path):
    """Enough prompts at once that vLLM would chunk prefills; its chunked-prefill path rewinds seeded
    generators, which CPU generators cannot do (the engine died with 'CPU Generator does not use offset'
    before the CPU defaults turned chunked prefill off). The engine is the one the reference store
    used, kept: the same engine arguments start nothing new."""
    from distill.vllm import engine

    kept = engine._kept["llm"]
    assert kept is not None  # the reference's engine, kept after its command
    out = cli(
        "generate",
        str(TINY),
        *SAMPLE,
        "generate.num_sequences=400",
        "generate.items_per_shard=400",
        "generate.samples_per_prompt=1",
        "generate.max_new_tokens=16",
        runs=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    store = TeacherStore(tmp_path / "tiny" / "teacher")
    assert store.summary()["rows"] == 400
    assert sum(c.num_positions for c in store.rows()) > 400 * 8
    assert engine._kept["llm"] is kept  # reused and kept again, not replaced by a second start


@pytest.mark.slow
def test_rerun_reuses_and_changed_settings_are_refused(reference, tmp_path):
    runs = reference.parent.parent
    again = cli("generate", str(TINY), *SAMPLE, runs=runs)
    assert again.returncode == 0 and "generate: shard-" not in again.stdout  # nothing recomputed
    changed = cli("generate", str(TINY), *SAMPLE, "generate.temperature=0.7", runs=runs)
    assert changed.returncode == 1
    assert "different settings (capture.temperature changed); pass --overwrite" in changed.stderr


def generate_process(runs, *args) -> list[str]:
    """`distill generate` as its own process (to be signalled), sample mode on the micro teacher."""
    return [sys.executable, "-m", "distill", *argv("generate", str(TINY), *SAMPLE, *args, runs=runs)]


def start_and_wait_for(cmd, store, shards: int, **pipes) -> subprocess.Popen:
    """Start `cmd` and return it once its store has recorded `shards` finished shards."""
    proc = subprocess.Popen(cmd, **{"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **pipes})
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        manifest = store / "manifest.json"
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= shards:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "generation finished before it could be stopped"
    return proc


@pytest.mark.slow
def test_sigterm_stops_the_engine_processes_and_keeps_what_was_recorded(reference, tmp_path):
    """SIGTERM to distill's pid alone (a scheduler, a timeout): it stops vLLM's engine processes and
    exits; the shards it finished are intact and, computed in another process, equal the reference's."""
    store = tmp_path / "runs" / "tiny" / "teacher"
    # vLLM's default (the test suite runs engines in-process: tests/conftest.py pytest_configure)
    multiprocess = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    proc = start_and_wait_for(
        generate_process(tmp_path / "runs"), store, 1, stderr=subprocess.PIPE, text=True, env=multiprocess
    )
    engine = psutil.Process(proc.pid).children(recursive=True)
    assert engine, "vLLM's engine core runs in a process of its own"
    proc.terminate()
    assert proc.wait(timeout=180) == 143
    # distill's last word; multiprocessing's resource tracker (vLLM's) may warn after it on the same stderr
    ours = [line for line in proc.stderr.read().splitlines() if line.startswith("distill: ")]
    assert ours[-1].startswith("distill: terminated (SIGTERM)"), ours
    _, alive = psutil.wait_procs(engine, timeout=60)
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"
    done = shard_hashes(store)
    assert 1 <= len(done) < 12
    TeacherStore(store).verify()  # what was recorded before the signal is intact
    assert done == {name: sha for name, sha in shard_hashes(reference).items() if name in done}


@pytest.mark.slow
def test_transformers_samples_of_a_prompt_do_not_depend_on_its_batch(cache_dir, tmp_path):
    """HfTeacher.sample decodes a batch of prompts (left-padded, KV cache); each prompt draws from a
    generator seeded by its global index, so batch size, batch neighbours and the shard a prompt falls in
    change nothing, and greedy decoding is transformers' own generate()."""
    import random

    import torch

    from distill.config import load_recipe
    from distill.teacher import HfTeacher, SampleSettings

    recipe = load_recipe(TINY, [*MICRO, *TEACHER, f"runs_dir={tmp_path}", f"cache_dir={cache_dir}"])
    model = str(teacher_of(recipe))
    rng = random.Random(0)
    items = [(f"p{i}", [rng.randrange(5, 4000) for _ in range(rng.randrange(3, 20))]) for i in range(12)]
    hot = SampleSettings(samples_per_prompt=2, max_new_tokens=24, temperature=1.0, top_p=0.95, seed=3)
    one, six = (HfTeacher(model, 8, "cpu", torch.float32, batch) for batch in (1, 6))
    by_one, by_six = one.sample(items, hot, 0), six.sample(items, hot, 0)
    assert [c.id for c in by_six] == [f"p{i}-s{j}" for i in range(12) for j in range(2)]
    assert [c.input_ids for c in by_one] == [c.input_ids for c in by_six]
    assert len({tuple(c.input_ids) for c in by_six}) == 24  # two different samples per prompt
    tail = six.sample(items[5:], hot, 5)  # a shard starting at prompt 5, batched differently
    assert [c.input_ids for c in tail] == [c.input_ids for c in by_six[10:]]
    for a, b in zip(by_one, by_six, strict=True):
        assert a.start == b.start and np.array_equal(a.topk_ids, b.topk_ids)
    cold = SampleSettings(samples_per_prompt=1, max_new_tokens=16, temperature=0.0, top_p=1.0, seed=0)
    eos = six.model.config.eos_token_id
    for (_, ids), capture in zip(items, six.sample(items, cold, 0), strict=True):
        with torch.no_grad():
            row = six.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=16,
                                     eos_token_id=eos, pad_token_id=eos)[0].tolist()  # fmt: skip
        end = next((n + 1 for n in range(len(ids), len(row)) if row[n] == eos), len(row))
        assert capture.input_ids == row[:end]


# Enough shards of the transformers teacher that a kill lands mid-store (it writes one in ~40 ms).
MANY = ["teacher.backend=hf", "generate.num_sequences=240"]


@pytest.fixture(scope="module")
def hf_reference(cache_dir, tmp_path_factory):
    """An uninterrupted store of the transformers teacher, MANY shards (in this process)."""
    runs = tmp_path_factory.mktemp("hf-reference")
    out = cli("generate", str(TINY), *SAMPLE, *MANY, runs=runs)
    assert out.returncode == 0, out.stderr[-3000:]
    return runs / "tiny" / "teacher"


@pytest.mark.slow
def test_kill_9_and_a_corrupted_shard_then_rerun_equal_the_uninterrupted_store(hf_reference, tmp_path):
    """About the store, not the engine: the transformers backend, so the killed run starts no engine."""
    runs = tmp_path / "runs"
    store = runs / "tiny" / "teacher"
    kill_tree(start_and_wait_for(generate_process(runs, *MANY), store, 2))
    done = TeacherStore(store).shards
    total = len(TeacherStore(hf_reference).shards)
    assert 2 <= len(done) < total
    first = store / sorted(done)[0]
    first.write_bytes(first.read_bytes()[:-100])  # damage a finished shard too

    out = cli("generate", str(TINY), *SAMPLE, *MANY, runs=runs)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{first} fails its checksum; redoing it" in out.stdout
    redone = [line for line in out.stdout.splitlines() if line.startswith("generate: shard-")]
    assert len(redone) == total - len(done) + 1  # finished shards were not redone
    TeacherStore(store).verify()
    assert shard_hashes(store) == shard_hashes(hf_reference)
    a, b = rows(store), rows(hf_reference)
    assert sorted(a) == sorted(b)  # same ids, no duplicates, no gaps
    assert all(np.array_equal(a[i].topk_ids, b[i].topk_ids) and a[i].input_ids == b[i].input_ids for i in a)


@pytest.mark.slow
def test_shards_on_separate_jobs_merge_into_the_unsharded_store(tmp_path):
    """About the store, not the engine: the transformers backend (it seeds each prompt by its index, as
    vLLM does), in this process, so no engine starts; vLLM's reruns match across processes in the kill-9
    test."""
    whole = cli("generate", str(TINY), *SAMPLE, "teacher.backend=hf", runs=tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    reference = tmp_path / "whole" / "tiny" / "teacher"
    runs = tmp_path / "runs"
    for index in (0, 1):
        out = cli("generate", str(TINY), *SAMPLE, "teacher.backend=hf", "--shard", f"{index}/2", runs=runs)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "complete: False" in out.stdout
    parts = [runs / "tiny" / f"teacher.shard-{i}-of-2" for i in (0, 1)]
    merged = tmp_path / "merged"
    out = cli("store", "merge", str(merged), *map(str, parts), runs=runs)
    assert out.returncode == 0, out.stderr
    assert shard_hashes(merged) == shard_hashes(reference)
    info = cli("store", "info", str(merged), runs=runs)
    assert "rows: 48" in info.stdout and "complete: True" in info.stdout and "bytes_per_token:" in info.stdout
    verify = cli("store", "verify", str(merged), runs=runs)
    assert verify.returncode == 0 and "ok: 12 shards" in verify.stdout


# Score mode with the sample tests' engine arguments: both tests below use the module's kept engine.
SCORE = [
    "teacher.backend=vllm",  # about vLLM's engine (auto would score 6 blocks with transformers)
    "generate.mode=score",
    "generate.num_sequences=6",
    "generate.items_per_shard=3",
    "generate.top_k=16",
]


@pytest.mark.slow
def test_score_mode_truncates_to_the_context_and_never_crashes(cache_dir, tmp_path):
    """300-token corpus blocks against the teacher's 256-token context (its max_position_embeddings). The
    teacher is given by path, so the longer blocks pretrain no other teacher and the engine is the kept one."""
    from distill.config import load_recipe

    teacher = teacher_of(
        load_recipe(TINY, [*MICRO, *TEACHER, f"runs_dir={tmp_path}", f"cache_dir={cache_dir}"])
    )
    by_path = ["teacher.tiny=null", f"teacher.model={teacher}", "data.seq_len=300"]
    out = cli("generate", str(TINY), *SCORE, *by_path, runs=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    store = TeacherStore(tmp_path / "tiny" / "teacher")
    summary = store.summary()
    assert summary["mode"] == "score" and summary["rows"] == 6 and summary["truncated"] == 6
    for c in store.rows():
        assert c.start == 0 and len(c.input_ids) == 255 and c.topk_ids.shape == (254, 16)
        assert np.all(c.topk_ids[np.arange(254), 0] >= 0)


@pytest.mark.slow
def test_vllm_and_transformers_agree_in_score_mode(cache_dir, prepared, tmp_path):
    """The same 47-token sequences scored by distill's vLLM teacher (the module's kept engine: the same
    engine arguments) and by its transformers teacher."""
    import torch

    from distill.config import load_recipe
    from distill.teacher import HfTeacher, VllmTeacher
    from distill.vllm import engine
    from distill.vllm.engine import teacher_engine_args

    recipe = load_recipe(TINY, [*MICRO, *TEACHER, *SCORE, f"runs_dir={tmp_path}", f"cache_dir={cache_dir}"])
    teacher = teacher_of(recipe)
    tokens = np.load(prepared.tokens_dir / "validation.npy")
    items = [(f"b{i}", tokens[i * 47 : (i + 1) * 47].astype(np.int64).tolist()) for i in range(8)]
    kept = engine._kept["llm"]
    vllm_teacher = VllmTeacher(teacher_engine_args(recipe, teacher), 16)
    assert kept is not None and vllm_teacher.llm is kept  # no second start for the same arguments
    try:
        vllm_caps = vllm_teacher.score(items)
    finally:
        vllm_teacher.close()
    hf_caps = HfTeacher(str(teacher), 16, "cpu", torch.float32, batch_size=4).score(items)
    r = {}
    for name, caps in (("vllm", vllm_caps), ("hf", hf_caps)):
        r[f"{name}_ids"] = np.stack([c.topk_ids for c in caps])
        r[f"{name}_lps"] = np.stack([c.topk_logprobs for c in caps])
        r[f"{name}_token_lps"] = np.stack([c.token_logprobs for c in caps])
    assert r["vllm_ids"].shape == r["hf_ids"].shape == (8, 46, 16)
    assert np.abs(r["vllm_lps"] - r["hf_lps"]).max() < 1e-3
    assert np.abs(r["vllm_token_lps"] - r["hf_token_lps"]).max() < 1e-3
    differ = r["vllm_ids"] != r["hf_ids"]
    # ids differ only where two candidates tie (within the logprob tolerance)
    assert differ.mean() < 0.01
    rows_, pos, ranks = np.nonzero(differ)
    for b, t, j in zip(rows_, pos, ranks, strict=True):
        neighbours = r["hf_lps"][b, t, max(j - 1, 0) : j + 2]
        assert np.ptp(neighbours) < 2e-3 or abs(r["vllm_lps"][b, t, j] - r["hf_lps"][b, t, j]) < 1e-3


def test_k_above_the_engine_limit_says_what_to_set(cache_dir, tmp_path):
    """Refused by the recipe's validation: before the teacher is pretrained or loaded."""
    out = cli("generate", str(TINY), *SAMPLE, "generate.engine.max_logprobs=8", runs=tmp_path)
    assert out.returncode == 1
    assert (
        "generate.engine: max_logprobs=8 is below generate.top_k=16; raise max_logprobs to at least 16"
        in out.stderr
    )
    assert not (tmp_path / "tiny").exists()


def test_teacher_that_is_not_a_causal_lm(cache_dir, prepared, tmp_path):
    model = tmp_path / "encoder"
    shutil.copytree(prepared.tokenizer_dir, model)
    (model / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "vocab_size": 4096}))
    out = cli("generate", str(TINY), "teacher.tiny=null", f"teacher.model={model}", runs=tmp_path)
    assert out.returncode == 1
    assert (
        f"teacher.model: {model} is not a causal language model (architectures: ['BertModel'])" in out.stderr
    )
    missing = cli("generate", str(TINY), "teacher.tiny=null", f"teacher.model={tmp_path}/nope", runs=tmp_path)
    assert (
        missing.returncode == 1
        and f"teacher.model: model path does not exist: {tmp_path}/nope" in missing.stderr
    )


def test_hf_backend_samples_into_the_same_kind_of_store(cache_dir, tmp_path):
    hf = [
        "teacher.backend=hf",
        "generate.num_sequences=4",
        "generate.items_per_shard=2",
        "generate.max_new_tokens=8",
    ]
    out = cli("generate", str(TINY), *SAMPLE, *hf, runs=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    store = TeacherStore(tmp_path / "tiny" / "teacher")
    assert store.summary()["backend"] == "hf" and store.summary()["rows"] == 8
    for c in store.rows():
        assert 0 < c.num_positions <= 8 and c.topk_ids.shape[1] == 16
        assert np.all(np.diff(c.topk_logprobs, axis=1) <= 1e-6)
    mixed = cli("generate", str(TINY), *SAMPLE, *hf[1:], "teacher.backend=vllm", runs=tmp_path)  # same store
    assert mixed.returncode == 1 and "capture.backend changed" in mixed.stderr
    auto = cli("generate", str(TINY), *SAMPLE, *hf[1:], runs=tmp_path)  # auto keeps the store's engine
    assert auto.returncode == 0 and "teacher.backend auto: transformers (continuing" in auto.stdout


def test_top_k_above_the_vocabulary_is_one_line_and_leaves_nothing_behind(cache_dir, tmp_path):
    from distill.config import load_recipe

    teacher = tmp_path / "teacher"  # the micro teacher, declaring a vocabulary below the recipe's top_k
    shutil.copytree(teacher_of(load_recipe(TINY, [*MICRO, *TEACHER, f"cache_dir={cache_dir}"])), teacher)
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "vocab_size": 500}))
    real = ["teacher.tiny=null", f"teacher.model={teacher}"]
    out = cli("generate", str(TINY), *SAMPLE, *real, "generate.top_k=512", runs=tmp_path)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr[-3000:]
    assert (
        f"generate.top_k=512 exceeds the teacher's vocabulary (500 tokens, {teacher / 'config.json'})"
        in out.stderr
    )
    assert not (tmp_path / "tiny" / "teacher").exists()  # no empty store to block the corrected run

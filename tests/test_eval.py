"""`distill eval` for real: lm-eval (hf and vllm backends) on micro models and the local tasks, the gate's
verdict and exit status, reuse of unchanged results, fail-closed crashes and bad input."""

import json
import shutil
import subprocess
import sys

import pytest

from .conftest import MICRO, TEACHER, TINY, run_cli, teacher_of

STRICT = [
    "eval.limit=30",
    "eval.batch_size=8",
    "eval.gate.criteria=[{task: distill_ppl, metric: bits_per_byte, min_retention: 1.0},"
    " {task: distill_cloze, metric: acc, min_retention: 1.0}, {task: distill_nextword, metric: exact_match,"
    " max_drop: 0.0}]",
]


def eval_argv(*args, runs):
    # the serving benchmark's acceptance floor of tiny.yaml is not what these tests judge (test_serve does)
    return ["eval", str(TINY), *MICRO, *TEACHER, f"runs_dir={runs}", "eval.gate.min_acceptance_rate=null",
            *args]  # fmt: skip


def distill_eval(*args, runs, env=None):
    cmd = [sys.executable, "-m", "distill", *eval_argv(*args, runs=runs)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def random_student(prepared, tmp_path_factory):
    """A random-weight student of the micro teacher's shape, with the corpus tokenizer (no pretraining)."""
    from distill.config import load_recipe
    from distill.models import build_tiny_llama
    from distill.tokenizer import load_tokenizer

    random = tmp_path_factory.mktemp("random") / "random"
    tiny = load_recipe(TINY, MICRO).teacher.tiny
    tokenizer = load_tokenizer(prepared.tokenizer_dir)
    build_tiny_llama(tiny, tokenizer, seed=7).save_pretrained(random)
    tokenizer.save_pretrained(random)
    return random


@pytest.fixture(scope="module")
def models(cache_dir, random_student, tmp_path_factory):
    """The micro teacher, a byte-identical copy of it, and a random-weight student of the same shape."""
    from distill.config import load_recipe

    root = tmp_path_factory.mktemp("models")
    recipe = load_recipe(TINY, [*MICRO, *TEACHER, f"runs_dir={root / 'runs'}", f"cache_dir={cache_dir}"])
    teacher = teacher_of(recipe)
    twin = root / "twin"
    shutil.copytree(teacher, twin)
    # the same weights in other files (config.json written anew): evaluated, where the twin's results are
    # the teacher's, copied (distill eval evaluates byte-identical models once)
    resaved = root / "resaved"
    shutil.copytree(teacher, resaved)
    config = json.loads((teacher / "config.json").read_text())
    (resaved / "config.json").write_text(json.dumps(config, indent=4, sort_keys=True))
    return {"teacher": teacher, "twin": twin, "resaved": resaved, "random": random_student}


def gate_of(runs):
    return json.loads((runs / "tiny" / "eval" / "gate.json").read_text())


def per_doc(runs, model, task):
    path = runs / "tiny" / "eval" / "models" / model / "samples" / f"{task}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def hf_eval(models, tmp_path_factory):
    """The teacher and its twin under STRICT through transformers, once: the reference the vllm and
    local-completions backends are compared with. Returns (runs_dir, stdout); tests copy it to change it."""
    runs = tmp_path_factory.mktemp("hf-eval")
    out = run_cli(*eval_argv(*STRICT, "eval.backend=hf", f"--model=twin={models['twin']}", runs=runs))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return runs, out


@pytest.mark.slow
def test_the_teacher_passes_against_itself_and_a_random_student_fails(models, hf_eval, tmp_path):
    runs, out = hf_eval
    shutil.copytree(runs / "tiny", tmp_path / "tiny")
    assert "gate: PASSED (3 checks" in out.stdout
    # the twin is the teacher's bytes: its results are the teacher's, copied, not evaluated a second time
    assert "eval: twin: " in out.stdout and "[reused (same files and settings as teacher)]" in out.stdout
    assert per_doc(tmp_path, "twin", "distill_cloze") == per_doc(tmp_path, "teacher", "distill_cloze")
    gate = gate_of(tmp_path)
    assert gate["passed"] and [c["margin"] for c in gate["checks"]] == [0, 0, 0]
    assert {c["noise"] for c in gate["checks"]} == {"paired (30 documents)"}
    scores = gate["models"]["teacher"]["scores"]
    assert 0 < scores["distill_ppl"]["bits_per_byte"] < 12 and 0 <= scores["distill_cloze"]["acc"] <= 1
    assert scores["distill_cloze"]["acc_stderr"] > 0
    assert len(per_doc(tmp_path, "teacher", "distill_cloze")) == 30

    # a random-weight student: the gate fails with its own exit status; unchanged models are reused.
    # This time from the run directory, whose recipe.yaml holds the settings above.
    run_dir = tmp_path / "tiny"
    out = run_cli("eval", run_dir, f"--model=twin={models['twin']}", f"--model=random={models['random']}")
    assert out.returncode == 3, out.stderr[-3000:]
    assert "eval: teacher: " in out.stdout and out.stdout.count("[reused (same files and settings)]") == 2
    assert "gate: FAILED" in out.stdout and "random: distill_ppl bits_per_byte" in out.stdout
    gate = gate_of(tmp_path)
    assert not gate["passed"]
    by_model = {}
    for c in gate["checks"]:
        by_model.setdefault(c["model"], []).append(c)
    assert all(c["passed"] for c in by_model["twin"])
    ppl = next(c for c in by_model["random"] if c["task"] == "distill_ppl")
    assert (
        not ppl["passed"] and ppl["value"] > ppl["reference"] + 0.3
    )  # bits per byte well above the teacher's
    manifest = json.loads((tmp_path / "tiny" / "manifest.json").read_text())
    assert manifest["stages"]["eval"]["status"] == "failed"

    # the vllm backend scores the same documents the same way
    vllm_runs = tmp_path / "vllm"
    out = distill_eval(*STRICT, "eval.backend=vllm", f"--model=twin={models['twin']}", runs=vllm_runs)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "[reused (same files and settings as teacher)]" in out.stdout  # one engine: the teacher's
    for task, metric in (("distill_cloze", "acc"), ("distill_nextword", "exact_match")):
        hf, vl = per_doc(tmp_path, "teacher", task), per_doc(vllm_runs, "teacher", task)
        assert [r["doc_hash"] for r in hf] == [r["doc_hash"] for r in vl]
        assert sum(a[metric] == b[metric] for a, b in zip(hf, vl, strict=True)) >= 28
    hf, vl = per_doc(tmp_path, "teacher", "distill_ppl"), per_doc(vllm_runs, "teacher", "distill_ppl")
    for a, b in zip(hf, vl, strict=True):
        assert b["bits_per_byte"][0] == pytest.approx(a["bits_per_byte"][0], rel=1e-3)


@pytest.mark.slow
def test_local_completions_against_running_servers_and_servers_it_starts(
    models, hf_eval, teacher_server, tmp_path
):
    """The teacher is the session's running `vllm serve` (eval.servers); distill starts the random
    student's (which the gate then fails, as through transformers)."""
    requests = teacher_server.log_path.read_text().count("POST /v1/completions")
    out = distill_eval(
        *STRICT, "eval.backend=local-completions", f"eval.servers.teacher={teacher_server.url}",
        f"--model=random={models['random']}", runs=tmp_path,
    )  # fmt: skip
    assert out.returncode == 3 and "gate: FAILED" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    assert "random: distill_ppl bits_per_byte" in out.stdout
    assert (tmp_path / "tiny" / "eval" / "server-random.log").exists()  # the one distill started
    assert not (tmp_path / "tiny" / "eval" / "server-teacher.log").exists()
    assert teacher_server.log_path.read_text().count("POST /v1/completions") > requests + 30
    # the same documents score as through transformers
    hf_runs = hf_eval[0]
    for task, metric in (("distill_cloze", "acc"), ("distill_nextword", "exact_match")):
        api, hf = per_doc(tmp_path, "teacher", task), per_doc(hf_runs, "teacher", task)
        assert sum(a[metric] == b[metric] for a, b in zip(api, hf, strict=True)) >= 28
    api, hf = per_doc(tmp_path, "teacher", "distill_ppl"), per_doc(hf_runs, "teacher", "distill_ppl")
    for a, b in zip(api, hf, strict=True):
        assert a["bits_per_byte"][0] == pytest.approx(b["bits_per_byte"][0], rel=1e-3)


@pytest.mark.slow
def test_a_model_that_crashes_fails_the_gate_closed(models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(models["twin"], broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    out = run_cli(*eval_argv(*STRICT, "eval.backend=hf", f"--model=broken={broken}", runs=tmp_path))
    assert out.returncode == 3, out.stderr[-3000:]
    gate = gate_of(tmp_path)
    assert not gate["passed"] and gate["errors"][0].startswith("broken: evaluation failed: ")
    assert "teacher" in gate["models"] and "broken" not in gate["models"]


@pytest.mark.slow
def test_full_vocabulary_kl_and_top1_agreement_are_measured_and_gated(models, tmp_path):
    """distill_match_<source>: the teacher's weights in other files (measured, not copied) have KL 0 and
    agree everywhere; a random student does not, and a gate on them fails it. distill_outside_ppl scores
    text from outside the corpus."""
    criteria = (
        "eval.gate.criteria=[{task: distill_match_outside, metric: kl, min_value: 0.3},"
        " {task: distill_match_test, metric: top1_agreement, min_value: 0.5}]"
    )
    out = run_cli(*eval_argv("eval.limit=20", "eval.backend=hf", "eval.tasks=[distill_outside_ppl]",
                             "eval.teacher_match_documents=20", criteria, f"--model=twin={models['resaved']}",
                             f"--model=random={models['random']}", runs=tmp_path))  # fmt: skip
    assert out.returncode == 3, out.stdout[-3000:] + out.stderr[-3000:]
    gate = gate_of(tmp_path)
    twin, rand = gate["models"]["twin"]["scores"], gate["models"]["random"]["scores"]
    for source in ("test", "outside"):
        assert twin[f"distill_match_{source}"]["kl"] == pytest.approx(0.0, abs=1e-6)
        assert twin[f"distill_match_{source}"]["top1_agreement"] == 1.0
        assert (
            rand[f"distill_match_{source}"]["kl"] > 0.3  # measured 0.86 against the 40-step micro teacher
            and rand[f"distill_match_{source}"]["top1_agreement"] < 0.5
        )
    teacher = gate["models"]["teacher"]["scores"]
    assert 0 < teacher["distill_outside_ppl"]["bits_per_byte"] < rand["distill_outside_ppl"]["bits_per_byte"]
    verdicts = {(c["model"], c["task"]): c["passed"] for c in gate["checks"]}
    assert verdicts == {
        ("twin", "distill_match_outside"): True,
        ("twin", "distill_match_test"): True,
        ("random", "distill_match_outside"): False,
        ("random", "distill_match_test"): False,
    }
    rows = per_doc(tmp_path, "random", "distill_match_outside")
    assert len(rows) == 20 and all(r["kl"] > 0 for r in rows)
    # the resaved twin was evaluated, not copied (its config.json differs), and scores as the teacher does
    assert "as teacher)]" not in out.stdout
    pairs = zip(
        per_doc(tmp_path, "twin", "distill_outside_ppl"),
        per_doc(tmp_path, "teacher", "distill_outside_ppl"),
        strict=True,
    )
    assert all(a["bits_per_byte"][0] == pytest.approx(b["bits_per_byte"][0], rel=1e-6) for a, b in pairs)
    assert len(per_doc(tmp_path, "teacher", "distill_outside_ppl")) == 20
    report = (tmp_path / "tiny" / "report" / "report.md").read_text()
    assert "distill_match_outside" in report and "distill_outside_ppl" in report


def test_bad_input_is_refused_before_any_model_runs(random_student, tmp_path):
    """Refused before the teacher is resolved: this recipe's teacher would be pretrained first."""
    twin = f"--model=twin={random_student}"
    cases = [
        (
            ["eval.tasks=[distill_ppx]"],
            "eval.tasks[0]: unknown lm-eval task 'distill_ppx'; did you mean distill_ppl?",
        ),
        (
            ["eval.gate.criteria=[{task: distill_cloze, metric: exact_match, min_retention: 0.9}]"],
            "eval.gate.criteria[0].metric: distill_cloze does not produce 'exact_match'; it produces acc, acc_norm",
        ),
        (
            ["eval.gate.criteria=[{task: hellaswag, metric: acc, min_retention: 0.9}]"],
            "eval.gate.criteria[0].task: 'hellaswag' is not evaluated (eval.tasks: distill_ppl, "
            "distill_outside_ppl, distill_cloze, distill_nextword)",
        ),
        (
            ["eval.gate.criteria=[{task: distill_match_outside, metric: acc, min_value: 0.9}]"],
            "eval.gate.criteria[0].metric: distill_match_outside produces kl, top1_agreement, not 'acc'",
        ),
        (
            [
                "eval.teacher_match=[test]",
                "eval.gate.criteria=[{task: distill_match_outside, metric: kl, min_value: 1}]",
            ],
            "eval.gate.criteria[0].task: 'distill_match_outside' is not measured (eval.teacher_match: test)",
        ),
    ]
    for overrides, message in cases:
        out = run_cli(*eval_argv(*overrides, twin, runs=tmp_path))
        last = out.stderr.strip().splitlines()[-1]
        assert out.returncode == 1 and last == f"distill: error: {message}", out.stderr[-2000:]
    out = run_cli(*eval_argv(f"--model=gone={tmp_path / 'nope'}", runs=tmp_path))
    assert (
        out.returncode == 1 and f"--model gone: model path does not exist: {tmp_path / 'nope'}" in out.stderr
    )
    assert not (tmp_path / "tiny" / "eval" / "models").exists()  # nothing was evaluated


@pytest.mark.slow
def test_a_hub_task_while_offline_says_so_instead_of_hanging(models, tmp_path):
    import os

    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    out = distill_eval("eval.tasks=[arc_easy]", f"--model=twin={models['twin']}", runs=tmp_path, env=env)
    assert out.returncode == 1
    assert out.stderr.startswith(
        "distill: error: eval.tasks: arc_easy needs its dataset from the Hugging Face hub, which cannot be reached"
    ), out.stderr[-2000:]


@pytest.mark.slow
def test_a_task_group_is_gated_on_its_aggregate(models, cache_dir, tmp_path):
    """Groups (mmlu, ...) run as lm-eval groups: their aggregate metric is gated, their leaves scored."""
    from lm_eval.tasks import TaskManager

    from distill.config import load_recipe
    from distill.errors import DistillError
    from distill.gate import decide
    from distill.stages.evaluate import TASKS_DIR, EvalModel, evaluate_model, load_tasks, settings_of

    groups = tmp_path / "groups"
    groups.mkdir()
    (groups / "distill_mc.yaml").write_text(
        "group: distill_mc\ntask: [distill_cloze]\naggregate_metric_list:\n  - metric: acc\n"
        "    weight_by_size: true\nmetadata: {version: 1.0}\n"
    )
    criteria = "eval.gate.criteria=[{task: distill_mc, metric: acc, min_retention: 1.0}]"
    recipe = load_recipe(
        TINY, [*MICRO, *TEACHER, f"runs_dir={tmp_path}", f"cache_dir={cache_dir}", "eval.tasks=[distill_mc]",
               "eval.backend=hf", "eval.limit=12", criteria],
    )  # fmt: skip
    from distill.stages.prepare import prepare

    corpus = prepare(recipe).corpus
    manager = TaskManager(
        include_path=[str(TASKS_DIR), str(groups)],
        include_defaults=False,
        metadata={"distill_corpus_dir": str(corpus.root), "distill_seed": 1234},
    )
    tasks = load_tasks(recipe.eval, manager)
    assert tasks.requested == {"distill_mc": ["distill_cloze"]} and tasks.group_metrics == {
        "distill_mc": ["acc"]
    }
    bad = recipe.eval.model_copy(deep=True)
    bad.gate.criteria[0].metric = "acc_norm"
    with pytest.raises(
        DistillError,
        match="eval.gate.criteria.0..metric: distill_mc does not produce 'acc_norm'; it produces acc",
    ):
        load_tasks(bad, manager)

    settings = settings_of(recipe.eval, corpus.content_hash)
    records, samples = {}, {}
    for name, role in (("teacher", "teacher"), ("twin", "student")):
        model = EvalModel(name, models[name], role)
        records[name] = evaluate_model(
            model, recipe.eval, settings, manager, tasks, tmp_path / "m", cache_dir
        )
        samples[name] = {}
    assert "acc,none" in records["teacher"]["results"]["distill_mc"]  # the group's own aggregate
    assert (tmp_path / "m" / "teacher" / "samples" / "distill_cloze.jsonl").exists()
    gate = decide(recipe.eval.gate, records, samples)
    assert gate["passed"] and gate["checks"][0]["task"] == "distill_mc"
    assert gate["checks"][0]["noise"] == "stderr (no per-document values)"


@pytest.fixture(scope="module")
def strangers(models, cache_dir, tmp_path_factory):
    """Students with another tokenizer than the teacher's: `renamed` is the teacher with one token added
    to its vocabulary (so it reads every text exactly as the teacher does), `stranger` a random model
    with a 1,024-token tokenizer trained on the corpus."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill.config import load_recipe
    from distill.models import build_tiny_llama
    from distill.pipeline import open_run
    from distill.tokenizer import load_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("strangers")
    renamed = root / "renamed"
    tokenizer = load_tokenizer(models["teacher"])
    tokenizer.add_tokens(["<|renamed|>"], special_tokens=True)
    model = AutoModelForCausalLM.from_pretrained(models["teacher"], dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():  # the new token scores as the padding token, which the teacher never predicts
        for weights in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            weights[-1] = weights[tokenizer.pad_token_id]
    model.save_pretrained(renamed)
    tokenizer.save_pretrained(renamed)
    recipe = load_recipe(TINY, [*MICRO, *TEACHER, f"runs_dir={root / 'runs'}", f"cache_dir={cache_dir}"])
    own = load_tokenizer(train_tokenizer(open_run(recipe).data.corpus, 1024, cache_dir))
    stranger = root / "stranger"
    build_tiny_llama(recipe.teacher.tiny, own, seed=7).save_pretrained(stranger)
    own.save_pretrained(stranger)
    return {"renamed": renamed, "stranger": stranger}


BYTES_GATE = "eval.gate.criteria=[{task: distill_bytes_test, metric: byte_agreement, max_drop: 0.05}]"


@pytest.mark.slow
def test_students_with_another_tokenizer_are_measured_in_bytes_not_token_ids(models, strangers, tmp_path):
    """eval.byte_agreement (on by itself across tokenizers): the share of the teacher's greedy continuation
    bytes each model predicts; token-level KL and top-1 only where the token ids are the teacher's."""
    base = ["eval.limit=20", "eval.backend=hf", "eval.tasks=[distill_outside_ppl]",
            "eval.teacher_match_documents=20", "eval.teacher_match_tokens=64", f"--model=twin={models['twin']}",
            f"--model=renamed={strangers['renamed']}", f"--model=stranger={strangers['stranger']}"]  # fmt: skip
    # a token-level criterion cannot judge them: refused in one line before any model runs
    out = distill_eval(*base, "eval.gate.criteria=[{task: distill_match_test, metric: kl, min_value: 1}]",
                       runs=tmp_path)  # fmt: skip
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert (
        "eval.gate.criteria[0]: distill_match_test kl compares token ids, and renamed, stranger have another "
        "tokenizer than the teacher's; gate on distill_bytes_test byte_agreement"
    ) in out.stderr
    assert not (tmp_path / "tiny" / "eval" / "models").exists()

    out = distill_eval(*base, BYTES_GATE, runs=tmp_path)
    assert out.returncode == 3, out.stdout[-3000:] + out.stderr[-3000:]  # the random stranger fails
    gate = gate_of(tmp_path)
    scores = {name: m["scores"] for name, m in gate["models"].items()}
    for source in ("test", "outside"):
        task = f"distill_bytes_{source}"
        teacher = scores["teacher"][task]["byte_agreement"]
        assert teacher > 0.9  # its own greedy text, read back in its own tokens
        assert scores["twin"][task]["byte_agreement"] == teacher
        # the same model under a vocabulary one token larger reads the text exactly as the teacher does
        assert scores["renamed"][task]["byte_agreement"] == pytest.approx(teacher, abs=1e-6)
        assert scores["stranger"][task]["byte_agreement"] < 0.3
        rows = {name: per_doc(tmp_path, name, task) for name in scores}
        assert len({len(r) for r in rows.values()}) == 1 and len(rows["teacher"]) > 5  # paired by document
        assert all(r["bytes"] > 0 for r in rows["stranger"])
        # token ids are compared only where they mean the same tokens
        assert f"distill_match_{source}" in scores["twin"]
        assert (
            f"distill_match_{source}" not in scores["renamed"]
            and f"distill_match_{source}" not in scores["stranger"]
        )
    verdicts = {c["model"]: c["passed"] for c in gate["checks"]}
    assert verdicts == {"twin": True, "renamed": True, "stranger": False}
    assert "renamed: no expected acceptance: the student at" in out.stdout
    assert "cannot be the teacher's speculative-decoding draft" in out.stdout
    assert "twin: expected acceptance as the teacher's draft" in out.stdout


def test_the_serving_benchmark_leaves_out_a_draft_with_another_tokenizer(
    models, strangers, cache_dir, tmp_path
):
    from distill.config import load_recipe
    from distill.errors import DistillError
    from distill.pipeline import open_run
    from distill.stages.bench import available_setups, chosen_setups

    def run_with(*overrides):
        recipe = load_recipe(
            TINY, [*MICRO, *TEACHER, f"runs_dir={tmp_path}", f"cache_dir={cache_dir}", *overrides]
        )
        return open_run(recipe)

    run = run_with()
    shutil.copytree(strangers["renamed"], run.student)
    assert [s.name for s in available_setups(run)] == ["teacher", "student"]
    with pytest.raises(
        DistillError, match="teacher\\+student not in this run's setups .*cannot be the teacher's"
    ):
        chosen_setups(run_with("serve.bench.setups=[teacher,teacher+student]"))
    shutil.rmtree(run.student)
    shutil.copytree(models["twin"], run.student)  # the same vocabulary: the draft setups are back
    assert [s.name for s in available_setups(run)] == [
        "teacher",
        "teacher+student",
        "teacher+baseline",
        "student",
    ]

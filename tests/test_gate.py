"""The gate's decisions on synthetic lm-eval results: retention, drop and bounds in each metric's
direction, and evaluation noise (paired per-document, lm-eval's stderr, none)."""

import math

import numpy as np
import pytest

from distill.config import GateConfig, GateCriterion
from distill.gate import decide, failing, per_doc


def record(name, role, results, higher=None, base=None):
    higher = higher or {t: {m.split(",")[0]: True for m in v} for t, v in results.items()}
    return {
        "model": {"name": name, "role": role, "base": base},
        "results": results,
        "higher_is_better": higher,
    }


def acc_rows(correct):
    return [{"doc_id": i, "doc_hash": f"h{i}", "acc": float(c)} for i, c in enumerate(correct)]


def acc_record(name, role, correct, base=None):
    acc = float(np.mean(correct))
    stderr = float(np.std(correct, ddof=1) / math.sqrt(len(correct)))
    return record(name, role, {"cloze": {"acc,none": acc, "acc_stderr,none": stderr}}, base=base)


def gate(*criteria, **kw):
    return GateConfig(criteria=[GateCriterion(**c) for c in criteria], **kw)


RETAIN = {"task": "cloze", "metric": "acc", "min_retention": 1.0}


def run(cfg, models):
    records = {name: rec for name, (rec, _) in models.items()}
    samples = {name: {"cloze": rows} for name, (_, rows) in models.items() if rows is not None}
    return decide(cfg, records, samples)


def pair(teacher, student):
    return {
        "teacher": (acc_record("teacher", "teacher", teacher), acc_rows(teacher)),
        "student": (acc_record("student", "student", student), acc_rows(student)),
    }


def test_the_teacher_passes_against_itself_even_without_noise_allowance():
    correct = np.random.default_rng(0).random(200) < 0.6
    for noise in ("paired", "stderr", "none"):
        out = run(gate(RETAIN, noise=noise), pair(correct, correct))
        assert out["passed"] and out["checks"][0]["margin"] == 0


def test_a_difference_within_the_noise_passes_and_a_large_one_fails():
    rng = np.random.default_rng(1)
    teacher = rng.random(400) < 0.6
    tiny = teacher.copy()  # 12 documents lost and 8 won: 1 point below the teacher, as noise does
    tiny[np.flatnonzero(teacher)[:12]] = False
    tiny[np.flatnonzero(~teacher)[:8]] = True
    large = teacher.copy()
    large[np.flatnonzero(teacher)[:60]] = False  # 15 points below
    for noise in ("paired", "stderr"):
        ok = run(gate(RETAIN, noise=noise), pair(teacher, tiny))
        check = ok["checks"][0]
        assert ok["passed"] and check["within_noise"] and check["margin"] == pytest.approx(-0.01)
        bad = run(gate(RETAIN, noise=noise), pair(teacher, large))
        assert not bad["passed"] and not bad["checks"][0]["within_noise"]
        assert failing(bad) == [
            f"student: cloze acc {large.mean():.4g} misses {teacher.mean():.4g} (min_retention 1.0 of "
            f"teacher's {teacher.mean():.4g}) by 0.15, beyond 1.0 x its standard error "
            f"{bad['checks'][0]['se']:.3g}"
        ]
    # without a noise allowance even the tiny difference fails
    assert not run(gate(RETAIN, noise="none"), pair(teacher, tiny))["passed"]


def test_paired_standard_error_is_smaller_than_independent_stderrs_on_the_same_documents():
    rng = np.random.default_rng(2)
    teacher = rng.random(300) < 0.5
    student = teacher.copy()
    flip = rng.choice(300, 20, replace=False)
    student[flip] = ~student[flip]
    paired = run(gate(RETAIN, noise="paired"), pair(teacher, student))["checks"][0]
    independent = run(gate(RETAIN, noise="stderr"), pair(teacher, student))["checks"][0]
    assert paired["noise"] == "paired (300 documents)" and independent["noise"] == "stderr"
    assert paired["se"] < independent["se"] / 2
    # the paired se is that of the per-document differences
    diff = student.astype(float) - teacher.astype(float)
    assert paired["se"] == pytest.approx(np.std(diff, ddof=1) / math.sqrt(300))
    assert independent["se"] == pytest.approx(
        math.hypot(np.std(teacher, ddof=1) / math.sqrt(300), np.std(student, ddof=1) / math.sqrt(300))
    )


def test_paired_falls_back_to_stderr_when_the_documents_differ():
    teacher, student = np.array([1, 0, 1, 1] * 25, bool), np.array([1, 0, 0, 1] * 25, bool)
    models = pair(teacher, student)
    models["student"] = (models["student"][0], acc_rows(student)[:-1])
    assert run(gate(RETAIN), models)["checks"][0]["noise"] == "stderr (documents differ)"


def ppl_record(name, role, nll, units):
    bpb = sum(nll) / sum(units) / math.log(2)
    results = {"ppl": {"bits_per_byte,none": bpb, "bits_per_byte_stderr,none": "N/A"}}
    return record(name, role, results, higher={"ppl": {"bits_per_byte": False}})


def ppl_rows(nll, units):
    return [
        {"doc_id": i, "doc_hash": f"d{i}", "bits_per_byte": [-a, b]}
        for i, (a, b) in enumerate(zip(nll, units, strict=True))
    ]


def test_perplexity_direction_and_its_per_document_standard_error():
    rng = np.random.default_rng(3)
    units = rng.integers(200, 3000, 150).astype(float)
    teacher = units * rng.normal(1.5, 0.2, 150)
    student = teacher * 1.05 + units * rng.normal(0, 0.05, 150)  # about 5% more bits per byte
    influence, value = per_doc(ppl_rows(student, units), "bits_per_byte")
    assert value == pytest.approx(sum(student) / sum(units) / math.log(2))  # lm-eval's aggregate
    assert sum(influence.values()) == pytest.approx(0, abs=1e-9)
    # the delta-method standard error agrees with a bootstrap over documents
    boot = []
    for _ in range(2000):
        i = rng.integers(0, 150, 150)
        boot.append(student[i].sum() / units[i].sum() / math.log(2))
    se = np.std(list(influence.values()), ddof=1) / math.sqrt(150)
    assert se == pytest.approx(np.std(boot), rel=0.15)

    models = {
        "teacher": (ppl_record("teacher", "teacher", teacher, units), None),
        "student": (ppl_record("student", "student", student, units), None),
    }
    samples = {"teacher": {"ppl": ppl_rows(teacher, units)}, "student": {"ppl": ppl_rows(student, units)}}
    records = {k: v[0] for k, v in models.items()}

    def verdict(**rule):
        return decide(gate({"task": "ppl", "metric": "bits_per_byte", **rule}), records, samples)

    # lower is better: retention 0.9 allows up to teacher / 0.9 (11% more), 0.99 only 1% more
    assert verdict(min_retention=0.9)["passed"]
    strict = verdict(min_retention=0.99)
    assert not strict["passed"] and strict["checks"][0]["threshold"] > strict["checks"][0]["reference"]
    assert strict["checks"][0]["noise"] == "paired (150 documents)"
    # an absolute bound is a ceiling for a lower-is-better metric
    value = records["student"]["results"]["ppl"]["bits_per_byte,none"]
    assert verdict(min_value=value + 0.1)["passed"] and not verdict(min_value=value - 0.5)["passed"]


def test_quantized_students_are_held_to_their_unquantized_student():
    rng = np.random.default_rng(4)
    teacher = rng.random(400) < 0.7
    student = teacher.copy()
    student[np.flatnonzero(teacher)[:8]] = False
    quant_ok = student.copy()
    quant_bad = student.copy()
    quant_bad[np.flatnonzero(student)[:80]] = False
    models = pair(teacher, student)
    models["student-w8a8"] = (
        acc_record("student-w8a8", "quantized", quant_ok, base="student"),
        acc_rows(quant_ok),
    )
    models["student-w4a16"] = (
        acc_record("student-w4a16", "quantized", quant_bad, base="student"),
        acc_rows(quant_bad),
    )
    out = run(gate({"task": "cloze", "metric": "acc", "max_drop": 0.05}, quant_min_retention=0.99), models)
    by_model = {c["model"]: c for c in out["checks"]}
    assert by_model["student"]["against"] == "teacher" and by_model["student"]["passed"]
    assert (
        by_model["student-w8a8"]["against"] == "student"
        and by_model["student-w8a8"]["rule"] == "min_retention 0.99"
    )
    assert by_model["student-w8a8"]["passed"] and not by_model["student-w4a16"]["passed"]
    assert not out["passed"]


def test_a_missing_metric_in_results_is_an_error_and_fails_the_gate():
    models = pair(np.ones(10, bool), np.ones(10, bool))
    out = run(gate({"task": "cloze", "metric": "acc_norm", "min_retention": 0.9}), models)
    assert not out["passed"] and out["errors"] == [
        "student: cloze acc_norm: student has no acc_norm for cloze"
    ]


def test_a_criterion_needs_exactly_one_rule(tmp_path):
    from distill.config import load_recipe
    from distill.errors import DistillError

    from .conftest import TINY

    bad = "eval.gate.criteria=[{task: distill_cloze, metric: acc, min_retention: 0.9, max_drop: 0.1}]"
    with pytest.raises(
        DistillError,
        match=r"eval.gate.criteria.0: set exactly one of min_retention, max_drop, "
        r"min_value \(got min_retention, max_drop\)",
    ):
        load_recipe(TINY, [bad])


def bench_with(rate, draft_tokens=4000):
    row = {"acceptance_rate": rate, "mean_acceptance_length": 1 + 4 * rate, "draft_tokens": draft_tokens}
    return {"setups": {"teacher": {"acceptance_rate": None}, "teacher+student": row}}


def test_the_serving_benchmark_acceptance_joins_the_gate_and_fails_closed_without_it():
    from distill.gate import apply_acceptance

    passing = run(gate(RETAIN), pair([1] * 50, [1] * 50))
    assert passing["passed"]
    cfg = GateConfig(min_acceptance_rate=0.6)
    # measured above the floor: passes, with a serve check carrying the number
    decided = apply_acceptance(passing, cfg, bench_with(0.72))
    (serve,) = [c for c in decided["checks"] if c["task"] == "serve"]
    assert decided["passed"] and serve["value"] == 0.72 and serve["threshold"] == 0.6 and serve["passed"]
    assert serve["noise"] == "binomial (4000 draft tokens)" and len(decided["checks"]) == 2
    # below it by far more than its noise: fails, and says so
    low = apply_acceptance(decided, cfg, bench_with(0.3))
    assert not low["passed"] and len(low["checks"]) == 2  # replaced, not appended
    assert failing(low) == ["student: serve acceptance_rate 0.3 misses 0.6 (min_value 0.6) by 0.3, "
                            "beyond 1.0 x its standard error 0.00725"]  # fmt: skip
    # a shortfall within z standard errors of a small sample passes, as every other check
    assert apply_acceptance(passing, cfg, bench_with(0.58, draft_tokens=100))["passed"]
    # not measured (no bench, or one of another student): fail closed
    unmeasured = apply_acceptance(passing, cfg, None)
    assert not unmeasured["passed"]
    assert unmeasured["errors"] == [
        "acceptance: the distilled draft's acceptance rate is not measured for the current student "
        "(run `distill bench serve`)"
    ]
    # back above the floor: the evaluation's own verdict stands again
    assert apply_acceptance(unmeasured, cfg, bench_with(0.9))["passed"]
    # without a floor, the acceptance is not part of the gate
    assert apply_acceptance(passing, GateConfig(), None)["passed"]
    failed_eval = {**passing, "passed": False, "eval_passed": False}
    assert not apply_acceptance(failed_eval, cfg, bench_with(0.9))["passed"]


def test_gate_json_is_written_from_evals_results_and_a_bench_of_the_current_student(tmp_path):
    """The one writer: eval/results.json plus serve/bench.json (only if it measured the run's current
    student) make eval/gate.json; nothing is written before eval has finished; a new evaluation first
    marks the verdict as unfinished and drops the old results."""
    from distill import gate as gate_writer
    from distill.artifacts import atomic_write_json, read_json
    from distill.models import model_fingerprint
    from distill.run import RunDir

    layout = RunDir(tmp_path / "run")
    cfg = GateConfig(min_acceptance_rate=0.6)
    assert gate_writer.write(layout, cfg, tmp_path / "cache") is None and not layout.gate_file.exists()
    layout.student.mkdir(parents=True)
    (layout.student / "config.json").write_text("{}")
    (layout.student / "model.safetensors").write_bytes(b"weights")
    results = run(gate(RETAIN), pair([1] * 50, [1] * 50))  # what eval decided
    assert results["passed"]
    atomic_write_json(layout.eval_results, results)
    unmeasured = gate_writer.write(layout, cfg, tmp_path / "cache")
    assert not unmeasured["passed"] and read_json(layout.gate_file) == unmeasured  # fail closed: no bench yet
    bench = bench_with(0.72)
    fingerprint = model_fingerprint(layout.student, tmp_path / "cache")
    bench["setups"]["teacher+student"]["fingerprint"] = fingerprint
    atomic_write_json(layout.bench_file, bench)
    measured = gate_writer.write(layout, cfg, tmp_path / "cache")
    assert measured["passed"] and read_json(layout.gate_file)["checks"][-1]["value"] == 0.72
    (layout.student / "model.safetensors").write_bytes(b"retrained")  # the bench measured another student
    assert not gate_writer.write(layout, cfg, tmp_path / "cache")["passed"]
    gate_writer.begin_evaluation(layout)
    assert (
        read_json(layout.gate_file) == {"passed": False, "status": "evaluating"}
        and not layout.eval_results.exists()
    )

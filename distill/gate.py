"""The quality gate: does each student keep enough of the teacher's scores, given evaluation noise?

A criterion compares one task metric of a student with the teacher (`min_retention`, `max_drop`) or
with a fixed bound (`min_value`), in the metric's own direction (lm-eval's `higher_is_better`, so for
perplexities "retention" means student <= teacher / r). Quantized students are held to
`quant_min_retention` of their unquantized student on every criterion's metric.

Noise: the margin (how far the student is above its threshold) is an estimate from a finite sample of
documents. A check passes when the margin is >= 0, or when its shortfall is within `z` standard errors
of the margin (the difference cannot be told from noise). The standard error comes from
- `paired` (default): both models' per-document values on the same documents, so the documents'
  shared difficulty cancels; per-document influence values make this work for lm-eval's weighted
  perplexities too;
- `stderr`: lm-eval's own stderr of each score, combined as independent (perplexities, for which
  lm-eval reports none, use the per-document spread of the one model);
- `none`: the point estimates alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from distill.artifacts import atomic_write_json, read_json
from distill.config import GateConfig, GateCriterion
from distill.run import RunDir

DISTILLED_DRAFT = "teacher+student"  # bench.json's setup whose acceptance the gate checks

PERPLEXITY = {  # metric: transform of mean negative log-likelihood (nats per unit) into the metric
    "word_perplexity": math.exp,
    "byte_perplexity": math.exp,
    "bits_per_byte": lambda nats: nats / math.log(2),
}


@dataclass
class Check:
    model: str
    against: str  # teacher, the unquantized student, or "bound"
    task: str
    metric: str
    rule: str
    higher_is_better: bool
    value: float
    reference: float | None
    threshold: float
    margin: float  # >= 0: at or beyond the threshold, in the metric's better direction
    se: float | None
    noise: str  # how se was obtained
    passed: bool
    within_noise: bool  # passed only because the shortfall is within z standard errors


def result_key(results: dict, task: str, metric: str) -> str | None:
    """lm-eval's key for `metric` in a task's results: 'metric,none' or 'metric,<filter>'."""
    keys = [k for k in results.get(task, {}) if k.split(",")[0] == metric and "_stderr" not in k]
    return sorted(keys, key=lambda k: not k.endswith(",none"))[0] if keys else None


def per_doc(rows: list[dict], metric: str) -> tuple[dict[str, float], float]:
    """(document -> influence value, aggregate) of `metric`: for a mean metric the values themselves;
    for a perplexity, the linearised contribution of each document to the aggregate (the delta method on
    the ratio sum(-loglik) / sum(units)), whose mean is 0 and whose spread gives the standard error."""
    keyed = {str(r.get("doc_hash") or r["doc_id"]): r[metric] for r in rows if metric in r}
    if metric not in PERPLEXITY:
        values = {k: float(v) for k, v in keyed.items()}
        return values, sum(values.values()) / max(len(values), 1)
    nll = {k: -float(v[0]) for k, v in keyed.items()}
    units = {k: float(v[1]) for k, v in keyed.items()}
    mean_units = sum(units.values()) / len(units)
    rate = sum(nll.values()) / sum(units.values())  # nats per unit
    value = PERPLEXITY[metric](rate)
    slope = value if metric != "bits_per_byte" else 1 / math.log(2)  # d metric / d rate
    return {k: slope * (nll[k] - rate * units[k]) / mean_units for k in nll}, value


def _se(values: list[float]) -> float | None:
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _threshold(c: GateCriterion, higher: bool, reference: float | None) -> tuple[float, float, str]:
    """(threshold, coefficient of the reference in it, rule text)."""
    if c.min_retention is not None:
        coef = c.min_retention if higher else 1 / c.min_retention
        return coef * reference, coef, f"min_retention {c.min_retention}"
    if c.max_drop is not None:
        drop = c.max_drop if higher else -c.max_drop
        return reference - drop, 1.0, f"max_drop {c.max_drop}"
    return c.min_value, 0.0, f"{'min' if higher else 'max'}_value {c.min_value}"


def check(
    c: GateCriterion,
    gate: GateConfig,
    model: str,
    model_result: dict,
    against: str,
    against_result: dict | None,
    samples: tuple[list[dict] | None, list[dict] | None],
) -> Check:
    """One criterion for one model. `*_result` are results.json records; `samples` the two models'
    per-document rows of the task (None when absent)."""
    key = result_key(model_result["results"], c.task, c.metric)
    if key is None:
        raise ValueError(f"{model} has no {c.metric} for {c.task}")
    higher = model_result["higher_is_better"].get(c.task, {}).get(c.metric, True)
    if c.lower_is_better is not None:
        higher = not c.lower_is_better
    value = float(model_result["results"][c.task][key])
    reference = None
    if against_result is not None:
        reference = float(
            against_result["results"][c.task][result_key(against_result["results"], c.task, c.metric)]
        )
    threshold, coef, rule = _threshold(c, higher, reference)
    margin = (value - threshold) if higher else (threshold - value)
    se, noise = _margin_se(c, gate, model_result, against_result, samples, coef, key)
    passed = margin >= 0 or (se is not None and margin >= -gate.z * se)
    return Check(
        model, against if against_result is not None else "bound", c.task, c.metric, rule, higher, value,
        reference, threshold, margin, se, noise, passed, passed and margin < 0,
    )  # fmt: skip


def _margin_se(c, gate, model_result, against_result, samples, coef, key) -> tuple[float | None, str]:
    if gate.noise == "none":
        return None, "none"
    mine, theirs = samples
    if gate.noise == "paired" and mine:
        a, _ = per_doc(mine, c.metric)
        if coef == 0 or against_result is None:
            return _se(list(a.values())), f"per-document ({len(a)} documents)"
        if theirs:
            b, _ = per_doc(theirs, c.metric)
            if a.keys() == b.keys():
                return _se([a[k] - coef * b[k] for k in a]), f"paired ({len(a)} documents)"
    # lm-eval's stderr of each score, as independent
    parts = []
    for result, weight, rows in ((model_result, 1.0, mine), (against_result, coef, theirs)):
        if result is None or weight == 0:
            continue
        stderr = result["results"][c.task].get(key.replace(",", "_stderr,", 1))
        if not isinstance(stderr, int | float) and rows:
            stderr = _se(list(per_doc(rows, c.metric)[0].values()))
        if not isinstance(stderr, int | float):
            return None, "none (no stderr)"
        parts.append((weight * stderr) ** 2)
    fallback = ""
    if gate.noise == "paired":  # paired was asked for but could not be done
        fallback = " (documents differ)" if mine else " (no per-document values)"
    return math.sqrt(sum(parts)), f"stderr{fallback}"


def decide(gate: GateConfig, records: dict[str, dict], samples: dict[str, dict[str, list[dict]]]) -> dict:
    """The gate over every student: `records` are results.json records by model name (with 'role' and,
    for quantized students, 'base' in their 'model'), `samples` per model and task. Returns gate.json."""
    checks: list[Check] = []
    errors: list[str] = []
    teacher = next((n for n, r in records.items() if r["model"]["role"] == "teacher"), None)
    for name, record in records.items():
        role = record["model"]["role"]
        if role in ("teacher", "baseline"):  # the reference, and a student shown for comparison only
            continue
        for c in gate.criteria:
            against = teacher if role == "student" else record["model"]["base"]
            if role == "quantized":
                c = GateCriterion(task=c.task, metric=c.metric, min_retention=gate.quant_min_retention,
                                  lower_is_better=c.lower_is_better)  # fmt: skip
            elif c.min_value is not None:
                against = None
            try:
                pair = (samples.get(name, {}).get(c.task), samples.get(against, {}).get(c.task))
                checks.append(check(c, gate, name, record, against, records.get(against), pair))
            except (KeyError, ValueError, TypeError) as exc:
                errors.append(f"{name}: {c.task} {c.metric}: {exc}")
    passed = not errors and all(ch.passed for ch in checks)
    return {
        "passed": passed,
        "noise": gate.noise,
        "z": gate.z,
        "checks": [asdict(ch) for ch in checks],
        "errors": errors,
    }


def failing(decision: dict) -> list[str]:
    """One line per failed check or error, for the CLI."""
    lines = [f"error: {e}" for e in decision["errors"]]
    for ch in decision["checks"]:
        if ch["passed"]:
            continue
        against = f" of {ch['against']}'s {ch['reference']:.4g}" if ch["reference"] is not None else ""
        noise = f", beyond {decision['z']} x its standard error {ch['se']:.3g}" if ch["se"] else ""
        lines.append(
            f"{ch['model']}: {ch['task']} {ch['metric']} {ch['value']:.4g} misses {ch['threshold']:.4g} "
            f"({ch['rule']}{against}) by {-ch['margin']:.3g}{noise}"
        )
    return lines


def apply_acceptance(decision: dict, gate: GateConfig, bench: dict | None) -> dict:
    """gate.json with the distilled draft's speculative acceptance (from `distill bench serve`) checked
    against `min_acceptance_rate`. Without a measurement the check fails (fail closed). The verdict is
    the evaluation's (`eval_passed`) and this check together; applying it again replaces it."""
    decision = dict(decision)
    eval_passed = decision.setdefault("eval_passed", decision["passed"])
    checks = [c for c in decision["checks"] if c["task"] != "serve"]
    errors = [e for e in decision["errors"] if not e.startswith("acceptance:")]
    row = (bench or {}).get("setups", {}).get(DISTILLED_DRAFT, {})
    if gate.min_acceptance_rate is not None:
        rate = row.get("acceptance_rate")
        if rate is None:
            errors.append(
                "acceptance: the distilled draft's acceptance rate is not measured for the current student "
                "(run `distill bench serve`)"
            )
        else:
            m = gate.min_acceptance_rate
            draft_tokens = row.get("draft_tokens") or 0
            se = math.sqrt(rate * (1 - rate) / draft_tokens) if draft_tokens else None
            passed = rate >= m or (se is not None and rate >= m - gate.z * se)
            checks.append(asdict(Check(
                "student", "bound", "serve", "acceptance_rate", f"min_value {m}", True, rate, None, m,
                rate - m, se, f"binomial ({draft_tokens} draft tokens)", passed, passed and rate < m,
            )))  # fmt: skip
    decision.update(checks=checks, errors=errors)
    decision["passed"] = bool(eval_passed and not errors and all(c["passed"] for c in checks))
    return decision


# --------------------------------------------------------------------------- gate.json: one writer


def begin_evaluation(run: RunDir) -> None:
    """Before eval measures anything: gate.json fails closed ("evaluating") until `write` replaces it, so
    a killed evaluation never leaves an earlier verdict standing, and eval's old results are gone."""
    run.eval_dir.mkdir(parents=True, exist_ok=True)
    run.eval_results.unlink(missing_ok=True)
    atomic_write_json(run.gate_file, {"passed": False, "status": "evaluating"})


def write(run: RunDir, gate: GateConfig, cache_dir: Path) -> dict | None:
    """gate.json from what the stages wrote: eval's results (eval/results.json: scores, eval checks) and
    the serving benchmark (serve/bench.json, when it measured the current student): the only writer of
    the verdict. None (nothing written) before eval has finished."""
    if not run.eval_results.exists():
        return None
    decision = apply_acceptance(read_json(run.eval_results), gate, fresh_bench(run, cache_dir))
    atomic_write_json(run.gate_file, decision)
    return decision


def fresh_bench(run: RunDir, cache_dir: Path) -> dict | None:
    """serve/bench.json if its distilled draft is the run's current student, else None."""
    from distill.models import model_fingerprint

    if not run.bench_file.exists() or not (run.student / "config.json").exists():
        return None
    bench = read_json(run.bench_file)
    measured = bench["setups"].get(DISTILLED_DRAFT, {}).get("fingerprint", {}).get("weights_hash")
    return bench if measured == model_fingerprint(run.student, cache_dir)["weights_hash"] else None


def bench_in_order(setups: dict) -> list[tuple[str, dict]]:
    """bench.json's setups (stored with sorted keys) in the order of the tables: teacher, its drafts,
    the student, the quantized students."""
    rank = {"teacher": 0, DISTILLED_DRAFT: 1, "teacher+baseline": 2, "student": 3}
    return sorted(setups.items(), key=lambda kv: (rank.get(kv[0], 4), kv[0]))

"""The evaluation report renders from gate.json, the training log and the models, and holds their numbers."""

import json
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from distill.config import GateConfig, GateCriterion
from distill.errors import DistillError
from distill.gate import decide
from distill.stages.report import fmt, report


class Balanced(HTMLParser):
    """Checks that every opened element is closed in order (void elements aside); collects text."""

    VOID = {"meta", "br", "img", "hr", "input", "link"}
    SELF_CLOSED = {"line", "rect", "circle", "polyline", "path"}

    def __init__(self):
        super().__init__()
        self.stack, self.text, self.svgs = [], [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "svg":
            self.svgs += 1
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def model_dir(path, shapes):
    path.mkdir(parents=True)
    save_file({f"w{i}": torch.zeros(s) for i, s in enumerate(shapes)}, str(path / "model.safetensors"))
    (path / "config.json").write_text("{}")
    return str(path)


@pytest.fixture
def run_dir(tmp_path):
    rng = np.random.default_rng(0)
    teacher = rng.random(100) < 0.6
    student = teacher.copy()
    student[np.flatnonzero(teacher)[:30]] = False  # clearly worse: fails retention 0.95
    rows = lambda c: [{"doc_id": i, "doc_hash": f"h{i}", "acc": float(v)} for i, v in enumerate(c)]  # noqa: E731
    paths = {
        "teacher": model_dir(tmp_path / "m" / "t", [(64, 32), (32,)]),
        "student": model_dir(tmp_path / "m" / "s", [(16, 32)]),
    }
    records = {}
    for name, role, correct in (("teacher", "teacher", teacher), ("student", "student", student)):
        acc = float(correct.mean())
        records[name] = {
            "model": {"name": name, "role": role, "base": None, "path": paths[name]},
            "results": {"cloze": {"acc,none": acc, "acc_stderr,none": 0.05}},
            "higher_is_better": {"cloze": {"acc": True}},
        }
    cfg = GateConfig(criteria=[GateCriterion(task="cloze", metric="acc", min_retention=0.95)])
    gate = decide(cfg, records, {"teacher": {"cloze": rows(teacher)}, "student": {"cloze": rows(student)}})
    gate["models"] = {
        n: {
            "path": paths[n],
            "role": r["model"]["role"],
            "scores": {"cloze": {"acc": r["results"]["cloze"]["acc,none"], "acc_stderr": 0.05}},
            "seconds": 1.0,
        }
        for n, r in records.items()
    }
    gate["models"]["student"]["expected_acceptance"] = {
        "acceptance_rate": 0.4426, "mean_acceptance_length": 2.7705, "alpha": 0.7024,
        "num_speculative_tokens": 4, "temperature": 0.0,
    }  # fmt: skip
    gate["settings"] = {"backend": "hf", "dtype": "auto", "batch_size": 8, "seed": 1234}
    run = tmp_path / "runs" / "demo"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "gate.json").write_text(json.dumps(gate))
    (run / "student").mkdir()
    log = [{"step": 0, "val_acceptance": 0.1}]
    log += [{"step": s, "loss": 2.0 / s, "tokens": 100 * s} for s in range(1, 21)]
    log += [
        {"step": 10, "val_loss": 5.5, "val_kl": 0.8},
        {"step": 20, "val_loss": 5.2, "val_kl": 0.6, "val_acceptance": 0.3},
    ]
    (run / "student" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    manifest = {
        "stages": {
            "train": {
                "outputs": {
                    "student": "runs/demo/student/final",
                    "steps": 20,
                    "val_kl": 0.6,
                    "val_acceptance": 0.3,
                }
            }
        }
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run, gate


def test_the_report_renders_and_holds_the_gate_numbers(run_dir):
    run, gate = run_dir
    html_path = report(run)
    md = (run / "report" / "report.md").read_text()
    page = html_path.read_text()
    parser = Balanced()
    parser.feed(page)
    assert parser.stack == ["html"] or parser.stack == []  # everything inside <html> closed
    text = " ".join(parser.text)

    # the verdict first
    assert (
        md.splitlines()[2]
        == "**Gate FAILED: 0 of 1 checks passed (noise: paired, a shortfall within 1.0 standard errors passes)**"
    )
    assert page.index("Gate FAILED") < page.index("<h2>")
    check = gate["checks"][0]
    for value in (check["value"], check["reference"], check["threshold"]):
        assert fmt(value) in md and fmt(value) in text
    assert fmt(check["margin"], 3) in md and "FAIL" in text and "paired (100 documents)" in md
    # teacher vs student with stderr, sizes from the safetensors headers
    assert f"{fmt(gate['models']['teacher']['scores']['cloze']['acc'])} ± 0.05" in md
    # the student's expected acceptance as the teacher's draft; the teacher has none
    assert "| as the teacher's draft (k=4, T=0) | expected acceptance_rate |  | 0.4426 |" in md
    assert "| expected mean_acceptance_length |  | 2.77" in md
    assert "| teacher | 2,080 |" in md and "| student | 512 |" in md  # 64 x 32 + 32 and 16 x 32
    # charts: retention (one bar, red) and training curves, embedded in the HTML and beside the Markdown
    assert (
        parser.svgs == 2 and "![retention](retention.svg)" in md and "![training curves](training.svg)" in md
    )
    retention = (run / "report" / "retention.svg").read_text()
    assert retention.count('fill="#c62828"') == 1 and retention in page
    training = (run / "report" / "training.svg").read_text()
    for series in ("loss", "val_loss", "val_kl", "val_acceptance"):
        assert f">{series}</text>" in training
    assert "expected acceptance on the student's samples (val_acceptance, T = 1): 0.3" in md


def test_no_evaluation_no_report(tmp_path):
    with pytest.raises(DistillError, match="no evaluation to report: .*gate.json does not exist"):
        report(tmp_path)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "gate.json").write_text(json.dumps({"passed": False, "status": "evaluating"}))
    with pytest.raises(DistillError, match="the evaluation did not finish"):
        report(tmp_path)

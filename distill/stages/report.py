"""The evaluation report: `runs/<name>/report/report.md` and a self-contained `report.html`.

Everything comes from files the stages wrote: `eval/gate.json` (the verdict, every check and score),
`student/metrics.jsonl` (training curves), `manifest.json` (training outcome, acceptance) and the model
directories (sizes). Charts are inline SVG drawn here, so the HTML needs nothing but a browser, and the
Markdown links the same SVGs written beside it.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

from distill.artifacts import atomic_write_text, read_json
from distill.config import RecipeConfig
from distill.errors import DistillError
from distill.run import RunDir

PASS, FAIL, GRID, INK = "#2e7d32", "#c62828", "#dddddd", "#333333"
SERIES = ("#1565c0", "#ef6c00", "#6a1b9a", "#00838f")


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


# --------------------------------------------------------------------------- charts (inline SVG)


def retention_chart(checks: list[dict]) -> str | None:
    """One bar per check against a reference: the student's retention (in the metric's better direction,
    1.0 = as good as the reference), with its threshold as a tick; green passed, red failed."""
    rows = [c for c in checks if c["reference"]]
    if not rows:
        return None

    def ratio(value, reference, higher):
        return value / reference if higher else reference / value

    bars = [
        (
            f"{c['model']} · {c['task']} {c['metric']}",
            ratio(c["value"], c["reference"], c["higher_is_better"]),
            ratio(c["threshold"], c["reference"], c["higher_is_better"]),
            c["passed"],
        )
        for c in rows
    ]
    top = max(1.1, *(max(b[1], b[2]) for b in bars)) * 1.05
    label_w, plot_w, row_h = 330, 420, 28
    width, height = label_w + plot_w + 70, 40 + row_h * len(bars) + 30
    x = lambda v: label_w + plot_w * max(v, 0) / top  # noqa: E731
    out = [_svg_open(width, height, "Retention of the reference's score per check")]
    for tick in _ticks(0, top):
        out.append(_line(x(tick), 30, x(tick), height - 30, GRID))
        out.append(_text(x(tick), height - 12, f"{tick:g}", anchor="middle", size=11))
    out.append(_line(x(1), 26, x(1), height - 30, INK, dash="4 3"))
    for i, (label, value, threshold, passed) in enumerate(bars):
        y = 36 + i * row_h
        color = PASS if passed else FAIL
        out.append(_text(label_w - 8, y + 14, label, anchor="end", size=12))
        out.append(
            f'<rect x="{label_w}" y="{y + 3}" width="{x(value) - label_w:.1f}" height="16" fill="{color}"/>'
        )
        out.append(_line(x(threshold), y, x(threshold), y + 22, INK, width=2.5))
        out.append(_text(x(value) + 4, y + 15, f"{value:.3f}", size=11))
    out.append(_text(label_w, 18, "retention (1 = the reference's score; black tick = threshold)", size=12))
    out.append("</svg>")
    return "\n".join(out)


def curves_chart(rows: list[dict], title: str) -> str | None:
    """Training loss per logged step, with the held-out values (val_loss, val_kl, val_acceptance)
    each on its own scale, as small multiples."""
    series = [
        (key, [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float) and "step" in r])
        for key in ("loss", "val_loss", "val_kl", "val_acceptance")
    ]
    series = [(k, pts) for k, pts in series if pts]
    if not series:
        return None
    panel_w, panel_h, pad = 300, 170, 44
    width, height = pad + len(series) * (panel_w + pad), panel_h + 70
    steps = [s for _, pts in series for s, _ in pts]
    lo_s, hi_s = min(steps), max(max(steps), min(steps) + 1)
    out = [_svg_open(width, height, title)]
    for i, (key, pts) in enumerate(series):
        x0 = pad + i * (panel_w + pad)
        values = [v for _, v in pts]
        lo, hi = min(values), max(values)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        px = lambda s, x0=x0: x0 + panel_w * (s - lo_s) / (hi_s - lo_s)  # noqa: E731
        py = lambda v, lo=lo, hi=hi: 30 + panel_h * (1 - (v - lo) / (hi - lo))  # noqa: E731
        out.append(
            f'<rect x="{x0}" y="30" width="{panel_w}" height="{panel_h}" fill="none" stroke="{GRID}"/>'
        )
        out.append(_text(x0, 20, key, size=13))
        for tick in (lo, (lo + hi) / 2, hi):
            out.append(_text(x0 - 4, py(tick) + 4, f"{tick:.3g}", anchor="end", size=10))
        for tick in (lo_s, hi_s):
            out.append(_text(px(tick), 30 + panel_h + 16, f"{tick:g}", anchor="middle", size=10))
        color = SERIES[i % len(SERIES)]
        points = " ".join(f"{px(s):.1f},{py(v):.1f}" for s, v in pts)
        if len(pts) > 1:
            out.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
        for s, v in pts:
            out.append(f'<circle cx="{px(s):.1f}" cy="{py(v):.1f}" r="2.5" fill="{color}"/>')
    out.append(_text(width / 2, height - 8, "step", anchor="middle", size=11))
    out.append("</svg>")
    return "\n".join(out)


def _svg_open(width: float, height: float, title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" role="img">'
        f"<title>{html.escape(title)}</title>"
        f'<rect width="100%" height="100%" fill="white"/>'
    )


def _line(x1, y1, x2, y2, color, width=1.0, dash=None) -> str:
    extra = f' stroke-dasharray="{dash}"' if dash else ""
    return (
        f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{color}" '
        f'stroke-width="{width}"{extra}/>'
    )


def _text(x, y, text, anchor="start", size=12) -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{INK}">'
        f"{html.escape(str(text))}</text>"
    )


def _ticks(lo: float, hi: float) -> list[float]:
    step = 0.25 if hi <= 2 else 0.5 if hi <= 4 else 1.0
    n = int(hi / step) + 1
    return [lo + i * step for i in range(n) if lo + i * step <= hi]


# --------------------------------------------------------------------------- content


def model_size(path: str) -> dict:
    """Parameters (from the safetensors headers, no weights loaded) and bytes on disk."""
    from safetensors import safe_open

    root = Path(path)
    files = sorted(root.glob("*.safetensors"))
    params = 0
    for f in files:
        with safe_open(f, "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                shape = fh.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                params += count
    disk = sum(p.stat().st_size for p in root.iterdir() if p.is_file())
    return {"parameters": params or None, "bytes": disk}


ROLE_ORDER = {"teacher": 0, "baseline": 1, "student": 2, "quantized": 3}


def by_role(models: dict) -> list[tuple[str, dict]]:
    """gate.json's models in table order: the teacher, the SFT baseline, students, quantized students."""
    return sorted(models.items(), key=lambda kv: (ROLE_ORDER.get(kv[1]["role"], 4), kv[0]))


def gather(run_dir: Path) -> dict:
    """What the report shows, from the run's files: gate, training curves, manifest, sizes, benchmark."""
    run = RunDir(run_dir)
    gate_path = run.gate_file
    if not gate_path.exists():
        raise DistillError(f"no evaluation to report: {gate_path} does not exist (run `distill eval` first)")
    gate = read_json(gate_path)
    if gate.get("status") == "evaluating":
        raise DistillError(f"{gate_path}: the evaluation did not finish (rerun `distill eval`)")
    metrics_path = run.output("student") / "metrics.jsonl"
    metrics = []
    if metrics_path.exists():
        metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    manifest = run.manifest.data
    sizes = {}
    for name, info in by_role(gate.get("models", {})):
        try:
            sizes[name] = model_size(info["path"])
        except (OSError, ValueError):  # a model moved since: report what is known
            sizes[name] = {"parameters": None, "bytes": None}
    bench = read_json(run.bench_file) if run.bench_file.exists() else None
    return {
        "run": run.path.name,
        "gate": gate,
        "metrics": metrics,
        "manifest": manifest,
        "sizes": sizes,
        "bench": bench,
    }


def serve_rows(bench: dict) -> tuple[list[str], list[list[str]]]:
    """`distill bench serve`: one row per setup and concurrency level."""
    header = ["setup", "concurrency", "output tok/s", "vs teacher", "TTFT p50/p95 ms", "ITL p50/p95 ms",
              "TPOT ms", "acceptance", "mean acceptance length", "errors", "model on disk"]  # fmt: skip
    teacher = bench["setups"].get("teacher", {}).get("levels", {})
    rows = []
    from distill.gate import bench_in_order

    for name, setup in bench_in_order(bench["setups"]):
        for level, v in sorted(setup["levels"].items(), key=lambda kv: int(kv[0])):
            base = teacher.get(level, {}).get("output_tokens_per_s")
            ratio = f"{v['output_tokens_per_s'] / base:.2f}x" if base and name != "teacher" else ""
            size = setup.get("bytes")
            rows.append([
                name, level, fmt(v["output_tokens_per_s"]), ratio,
                f"{fmt(v['ttft_ms_p50'])} / {fmt(v['ttft_ms_p95'])}",
                f"{fmt(v['itl_ms_p50'])} / {fmt(v['itl_ms_p95'])}", fmt(v["tpot_ms_mean"]),
                fmt(v.get("acceptance_rate")) if v.get("acceptance_rate") is not None else "",
                fmt(v.get("mean_acceptance_length")) if v.get("mean_acceptance_length") is not None else "",
                str(v["errors"]), f"{size / 2**20:.1f} MiB" if size else "",
            ])  # fmt: skip
    return header, rows


def score_rows(gate: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the teacher-vs-students table: one row per task metric, value ± stderr."""
    models = [name for name, _ in by_role(gate["models"])]
    header = ["task", "metric", *models]
    keys = []
    for info in gate["models"].values():
        for task, row in info["scores"].items():
            for metric in row:
                if not metric.endswith("_stderr") and (task, metric) not in keys:
                    keys.append((task, metric))
    rows = []
    for task, metric in keys:
        cells = []
        for m in models:
            row = gate["models"][m]["scores"].get(task, {})
            value, stderr = row.get(metric), row.get(f"{metric}_stderr")
            cells.append(fmt(value) + (f" ± {stderr:.2g}" if isinstance(stderr, float) else ""))
        rows.append([task, metric, *cells])
    expected = [gate["models"][m].get("expected_acceptance") or {} for m in models]
    settings = next((e for e in expected if e), None)
    if settings:  # distill.acceptance: each draft's predicted serving-benchmark acceptance
        what = (
            f"as the teacher's draft (k={settings['num_speculative_tokens']}, T={settings['temperature']:g})"
        )
        for metric in ("acceptance_rate", "mean_acceptance_length", "alpha"):
            rows.append([what, f"expected {metric}", *[fmt(e[metric]) if e else "" for e in expected]])
    return header, rows


def check_rows(gate: dict) -> tuple[list[str], list[list[str]]]:
    header = [
        "model",
        "task",
        "metric",
        "value",
        "reference",
        "threshold",
        "rule",
        "margin",
        "std. error",
        "noise",
        "",
    ]
    rows = []
    for c in gate["checks"]:
        verdict = "pass" if c["passed"] else "FAIL"
        if c["within_noise"]:
            verdict = "pass (within noise)"
        reference = f"{fmt(c['reference'])} ({c['against']})" if c["reference"] is not None else "bound"
        rows.append(
            [c["model"], c["task"], c["metric"], fmt(c["value"]), reference, fmt(c["threshold"]), c["rule"],
             fmt(c["margin"], 3), fmt(c["se"], 3), c["noise"], verdict]
        )  # fmt: skip
    return header, rows


def training_facts(manifest: dict) -> list[tuple[str, str]]:
    train = manifest.get("stages", {}).get("train")
    if not train:
        return []
    out = train.get("outputs", {})
    facts = [("student", out.get("student", "n/a")), ("steps", fmt(out.get("steps")))]
    for key, label in (
        ("val_loss", "held-out CE"),
        ("val_kl", "held-out KL to the teacher"),
        ("val_acceptance", "expected acceptance on the student's samples (val_acceptance, T = 1)"),
    ):
        if out.get(key) is not None:
            facts.append((label, fmt(out[key])))
    return facts


def size_rows(sizes: dict) -> tuple[list[str], list[list[str]]]:
    rows = []
    for name, s in sizes.items():
        count = s["parameters"]
        params = "n/a" if not count else f"{count / 1e6:.2f} M" if count >= 1e6 else f"{count:,}"
        disk = f"{s['bytes'] / 2**20:.1f} MiB" if s["bytes"] else "n/a"
        rows.append([name, params, disk])
    return ["model", "parameters", "on disk"], rows


# --------------------------------------------------------------------------- writers


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for c in row:
            cls = ' class="fail"' if c == "FAIL" else ' class="pass"' if c.startswith("pass") else ""
            cells.append(f"<td{cls}>{html.escape(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def verdict_line(gate: dict) -> str:
    checks = gate["checks"]
    passed = sum(c["passed"] for c in checks)
    word = "PASSED" if gate["passed"] else "FAILED"
    return (
        f"Gate {word}: {passed} of {len(checks)} checks passed"
        f" (noise: {gate['noise']}, a shortfall within {gate['z']} standard errors passes)"
    )


def report(run_dir: Path) -> Path:
    """Write report/report.md, report/report.html and the SVG charts of a run; return the HTML path."""
    data = gather(run_dir)
    gate = data["gate"]
    out = RunDir(run_dir).report_dir
    out.mkdir(parents=True, exist_ok=True)
    charts = {
        "retention.svg": retention_chart(gate["checks"]),
        "training.svg": curves_chart(data["metrics"], "Student training"),
    }
    for name, svg in charts.items():
        if svg:
            atomic_write_text(out / name, svg)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    settings = gate.get("settings", {})
    setting_line = ", ".join(
        f"{k} {settings[k]}" for k in ("backend", "dtype", "batch_size", "num_fewshot", "limit", "seed", "lm_eval")
        if k in settings
    )  # fmt: skip
    sections = [
        ("Checks", check_rows(gate)),
        ("Teacher vs students (value ± lm-eval stderr)", score_rows(gate)),
        ("Sizes", size_rows(data["sizes"])),
    ]
    if data["bench"]:
        b = data["bench"]["settings"]
        title = (
            f"Serving with vLLM (distill bench serve: {b['requests']} requests per level, {b['prompt_tokens']} "
            f"prompt + {b['max_tokens']} output tokens, {b['num_speculative_tokens']} draft tokens per step)"
        )
        sections.append((title, serve_rows(data["bench"])))
    facts = training_facts(data["manifest"])

    md = [f"# distill evaluation report: {data['run']}", "", f"**{verdict_line(gate)}**", ""]
    md += [f"- error: {e}" for e in gate["errors"]]
    md += ["", f"Generated {when}. lm-eval settings, identical for every model: {setting_line}.", ""]
    for title, (header, rows) in sections:
        md += [f"## {title}", "", _md_table(header, rows), ""]
    if charts["retention.svg"]:
        md += ["## Retention against thresholds", "", "![retention](retention.svg)", ""]
    if facts or charts["training.svg"]:
        md += ["## Training", ""]
        md += [f"- {label}: {value}" for label, value in facts]
        if charts["training.svg"]:
            md += ["", "![training curves](training.svg)"]
        md.append("")
    atomic_write_text(out / "report.md", "\n".join(md))

    color = PASS if gate["passed"] else FAIL
    body = [
        f"<h1>distill evaluation report: {html.escape(data['run'])}</h1>",
        f'<div class="verdict" style="background:{color}">{html.escape(verdict_line(gate))}</div>',
    ]
    if gate["errors"]:
        body.append("<ul>" + "".join(f"<li>{html.escape(e)}</li>" for e in gate["errors"]) + "</ul>")
    body.append(f"<p class=small>Generated {when}. lm-eval settings, identical for every model: "
                f"{html.escape(setting_line)}.</p>")  # fmt: skip
    for title, (header, rows) in sections:
        body += [f"<h2>{html.escape(title)}</h2>", _html_table(header, rows)]
    if charts["retention.svg"]:
        body += ["<h2>Retention against thresholds</h2>", charts["retention.svg"]]
    if facts or charts["training.svg"]:
        body.append("<h2>Training</h2>")
        body.append(
            "<ul>" + "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in facts) + "</ul>"
        )
        if charts["training.svg"]:
            body.append(charts["training.svg"])
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>distill report: {html.escape(data["run"])}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: {INK}; max-width: 1400px; }}
.verdict {{ color: white; font-size: 20px; font-weight: bold; padding: 12px 16px; border-radius: 6px; }}
table {{ border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
th {{ background: #f3f3f3; }}
td.fail {{ color: {FAIL}; font-weight: bold; }} td.pass {{ color: {PASS}; }}
.small {{ font-size: 12px; color: #666; }}
</style></head>
<body>
{chr(10).join(body)}
</body></html>
"""
    atomic_write_text(out / "report.html", page)
    return out / "report.html"


def pipeline_stages(recipe: RecipeConfig) -> list:
    """How `distill run` drives this stage (see distill.stages.Stage)."""
    from distill.stages import Stage

    layout = RunDir(recipe.run_dir)
    return [
        Stage(
            "report",
            {},
            run=lambda ctx, redo: {"report": str(report(layout.path))},
            outputs=lambda ctx: [layout.report_html],
            plan=lambda ctx: [f"distill report {layout.path}"],
        )
    ]

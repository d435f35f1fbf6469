"""The measured figures of the README and docs/, written from bench/results/*.json, never by hand.

    make figures                                  # = .venv/bin/python bench/figures.py: rewrite them all
    .venv/bin/python bench/figures.py --check     # exit 1 naming every block that is out of date
    .venv/bin/python bench/figures.py record demo RUN_DIR [--log FILE] [--fresh-clone-seconds S]
    .venv/bin/python bench/figures.py record tests --log FILE --total-seconds S [--commit SHA]
    .venv/bin/python bench/figures.py record serve RUN_DIR

A generated block is the text between a line `<!-- generated: NAME -->` and the next line
`<!-- end generated -->` in README.md or a page under docs/; NAME is a key of BLOCKS below, whose
function writes the block from the result files. Every block must appear somewhere and no unknown one
may, so a figure cannot be dropped or hand-edited unnoticed (tests/test_docs.py runs --check).
docs/kd-vs-sft.md, docs/prune-recovery.md and docs/cross-tokenizer-study.md are written whole, by
bench/kd_vs_sft.py's, bench/prune_recovery.py's and bench/cross_tokenizer.py's own render().

Where the figures come from:
- bench/results/{cross_tokenizer,kd_loss,kd_vs_sft,onpolicy,onpolicy_vs_offline,prune_recovery,
  teacher_capture,threads,train_processes,train_step}.json: the bench/ scripts of the same names write them;
- bench/results/demo.json: the summary `make demo` prints and its wall times (`record demo`);
- bench/results/tests.json: the fresh-clone `make test` (`record tests`);
- bench/results/serve_bench.json: `distill bench serve` and the eval stage's expected acceptance of a
  run (`record serve`);
- bench/results/smollm2.json: a `distill run recipes/smollm2-135m.yaml` (`record smollm2`);
  bench/results/real_teacher.json: bench/real_teacher.py; kd_loss_smollm2.json: bench/kd_loss.py --vocab 49152.
The last three were seeded once from the README's hand-typed figures; each says so in its `source`.
The module map (block `modules`) is the first sentence of each module docstring under distill/.
What each block says is in bench/figure_blocks.py; this file finds the blocks, checks and records.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import textwrap
import time
from pathlib import Path

import yaml
from figure_blocks import BLOCKS, RESULTS, ROOT, Page, result  # bench/ is on sys.path: a script's own folder

START = re.compile(r"^<!-- generated: ([\w-]+) -->$")
END = "<!-- end generated -->"
BLOCK_START = re.compile(r"([-+*>]|#+|\d+[.)])(\s|$)")
# pages written whole by a bench script's render(): page -> script (and its results file)
WHOLE_PAGES = {
    ROOT / "docs" / "kd-vs-sft.md": "kd_vs_sft",
    ROOT / "docs" / "prune-recovery.md": "prune_recovery",
    ROOT / "docs" / "cross-tokenizer-study.md": "cross_tokenizer",
}


# --------------------------------------------------------------------------- write and check


def wrap(lines: list[str], width: int = 110) -> list[str]:
    """Prose lines wrapped as the hand-written pages are; tables, lists and code blocks left alone."""
    out, fenced = [], False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        if fenced or line.startswith(("```", "|", "-", " ", "#")) or len(line) <= width:
            out.append(line)
        else:
            wrapped = textwrap.wrap(line, width, break_long_words=False, break_on_hyphens=False)
            for i in range(1, len(wrapped)):  # a line that would open a list, quote or heading
                while BLOCK_START.match(wrapped[i]) and " " in wrapped[i]:
                    word, wrapped[i] = wrapped[i].split(" ", 1)
                    wrapped[i - 1] += " " + word
            out += wrapped
    return out


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def where(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def fill(path: Path, used: set[str]) -> str:
    """The file's text with every generated block rewritten."""
    page, out, lines = Page(path), [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        out.append(lines[i])
        m = START.match(lines[i])
        i += 1
        if not m:
            continue
        name = m.group(1)
        if name not in BLOCKS:
            raise SystemExit(f"{where(path)}: unknown generated block {name!r} (known: {', '.join(BLOCKS)})")
        try:
            end = lines.index(END, i)
        except ValueError:
            raise SystemExit(f"{where(path)}: block {name!r} has no {END!r}") from None
        out += wrap(BLOCKS[name](page))
        used.add(name)
        i = end
    return "\n".join(out) + "\n"


def whole_page(script: str) -> str:
    """A page written whole by bench/<script>.py's own render(), from bench/results/<script>.json."""
    spec = importlib.util.spec_from_file_location(script, ROOT / "bench" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.render(result(script))


def generate() -> dict[Path, str]:
    """Every file that holds generated text, as it should read."""
    used: set[str] = set()
    texts = {path: fill(path, used) for path in pages() if path not in WHOLE_PAGES}
    for path, script in WHOLE_PAGES.items():
        texts[path] = whole_page(script)
    missing = set(BLOCKS) - used
    if missing:
        raise SystemExit(
            f"generated blocks used nowhere (README.md or docs/*.md): {', '.join(sorted(missing))}"
        )
    return texts


def main_write(check: bool) -> int:
    stale = []
    for path, text in generate().items():
        if path.read_text() != text:
            stale.append(where(path))
            if not check:
                path.write_text(text)
    if check and stale:
        print(
            f"out of date with bench/results and distill/: {', '.join(stale)}; run `make figures`",
            file=sys.stderr,
        )
        return 1
    print(f"{'checked' if check else 'wrote'}: " + (", ".join(stale) if stale else "everything up to date"))
    return 0


# --------------------------------------------------------------------------- recorders


def write_result(name: str, data: dict) -> None:
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote bench/results/{name}.json; now run `make figures`")


def summary_from_log(log: Path) -> list[str]:
    """The summary `distill run` printed last: from its last `run: ` line to the end."""
    lines = [line.rstrip() for line in log.read_text(errors="replace").splitlines()]
    starts = [i for i, line in enumerate(lines) if line.startswith("run: ")]
    if not starts:
        raise SystemExit(f"{log}: no `run: ` line, so no summary of `distill run` in it")
    tail = lines[starts[-1] :]
    ends = [i for i, line in enumerate(tail) if line.startswith("promoted: ")]  # the summary's last line
    tail = tail[: ends[0] + 1] if ends else tail  # (a shell's `time` and interpreter warnings may follow)
    return [line for line in tail if line.strip() and not line.startswith(("make", "real", "user", "sys"))]


def summary_from_run(run_dir: Path) -> tuple[list[str], dict]:
    """distill.pipeline.summary() of a finished run, its ran/seconds taken from the manifest (every
    stage the manifest records as finished counts as run; seconds are the stages' own, summed)."""
    from distill.config import load_recipe
    from distill.pipeline import FINISHED, STAGES, RunResult, summary

    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    done = [s for s in STAGES if manifest.get(s, {}).get("status") in FINISHED]
    recipe = load_recipe(run_dir / "recipe.yaml")
    total = sum(manifest[s]["seconds"] for s in done)
    return summary(recipe, RunResult(recipe, ran=done, seconds=total)), manifest


def record_demo(args: argparse.Namespace) -> None:
    demo = result("demo")
    run_dir = Path(args.run_dir)
    if args.log:
        lines = summary_from_log(Path(args.log))
        manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    else:
        lines, manifest = summary_from_run(run_dir)
    if not any(line.startswith("gate: ") for line in lines) or not any(
        line.startswith("|") for line in lines
    ):
        raise SystemExit(f"{run_dir}: not a finished demo run (its summary has no score table or gate line)")
    when = time.strftime("%Y-%m-%d")
    demo["summary"] = [line for line in lines if line.strip()]
    demo["source"] = args.source or f"recorded {when} by bench/figures.py record demo from {run_dir}" + (
        f" and the printed summary in {args.log}" if args.log else " (summary recomputed from its files)"
    )
    if "pretrain" in manifest and manifest["pretrain"].get("seconds"):
        demo["timings"]["teacher_pretrain_seconds"] = manifest["pretrain"]["seconds"]
        demo["timings"]["teacher_pretrain_note"] = "the manifest's pretrain stage"
    if args.fresh_clone_seconds is not None:
        demo["timings"]["fresh_clone_seconds"] = args.fresh_clone_seconds
        demo["timings"]["fresh_clone_note"] = args.note or "setup included"
    write_result("demo", demo)


def pytest_outcome(text: str) -> dict[str, int]:
    """passed/failed/skipped and the seconds from pytest's last closing line ("310 passed in 3536.12s")."""
    closing = re.findall(r"^=*\s*(.*\b(?:passed|failed)\b.*) in ([\d.]+)s\b", text, re.M)
    if not closing:
        raise SystemExit("no closing line of pytest ('N passed ... in S s')")
    counts, pytest_seconds = closing[-1]
    out = {}
    for key in ("passed", "failed", "skipped"):
        m = re.search(rf"(\d+) {key}", counts)
        out[key] = int(m.group(1)) if m else 0
    out["pytest_seconds"] = round(float(pytest_seconds))
    return out


def record_tests(args: argparse.Namespace) -> None:
    tests = result("tests")
    tests.update(pytest_outcome(Path(args.log).read_text(errors="replace")))
    tests["total_seconds"] = round(args.total_seconds)
    if args.commit:
        tests["commit"] = args.commit
    goal = "within the 15-minute goal" if args.total_seconds <= 900 else "over the 15-minute goal"
    budget = "within" if args.total_seconds <= 1800 else "over"
    tests["note"] = args.note or f"{goal} (issue 15), {budget} the 30-minute budget"
    tests["source"] = f"recorded {time.strftime('%Y-%m-%d')} by bench/figures.py record tests from {args.log}"
    write_result("tests", tests)


def record_serve(args: argparse.Namespace) -> None:
    """The serving table and the expected acceptance from a run's serve/bench.json and eval/gate.json.
    A run benchmarked at temperature 1 fills the temperature-1 comparison instead."""
    run_dir = Path(args.run_dir)
    bench = json.loads((run_dir / "serve" / "bench.json").read_text())
    gate = json.loads((run_dir / "eval" / "gate.json").read_text())
    serve = result("serve_bench")
    settings = bench["settings"]
    expected = {
        name: {k: m["expected_acceptance"][k] for k in ("acceptance_rate", "mean_acceptance_length")}
        for name, m in gate.get("models", {}).items()
        if m.get("expected_acceptance")
    }
    draft = bench["setups"]["teacher+student"]
    if settings["temperature"] == 1:
        serve["temperature_1"]["expected"] = expected["student"]
        serve["temperature_1"]["measured"] = {
            k: draft[k] for k in ("acceptance_rate", "mean_acceptance_length")
        }
    else:
        serve["settings"] = {k: settings[k] for k in ("concurrency", "requests", "prompt_tokens", "max_tokens", "temperature", "num_speculative_tokens")}  # fmt: skip
        serve["setups"] = {
            name: {
                "levels": {
                    level: {
                        "output_tokens_per_s": v["output_tokens_per_s"],
                        "ttft_ms_p50": v["ttft_ms_p50"],
                        "tpot_ms": v["tpot_ms_p50"],
                    }  # fmt: skip
                    for level, v in row["levels"].items()
                },
                "acceptance_rate": row.get("acceptance_rate"),
                "mean_acceptance_length": row.get("mean_acceptance_length"),
                "mib": row["bytes"] / 2**20,
            }
            for name, row in bench["setups"].items()
        }
        serve["expected_acceptance"] = expected
        serve["command"] = args.command or f"distill bench serve {run_dir}"
    serve["source"] = f"recorded {time.strftime('%Y-%m-%d')} by bench/figures.py record serve from {run_dir}"
    write_result("serve_bench", serve)


def record_smollm2(args: argparse.Namespace) -> None:
    """bench/results/smollm2.json (or --name's): the summary a `distill run` of a SmolLM2 recipe printed, its
    stages' seconds and its wall time."""
    run_dir, name = Path(args.run_dir), args.name
    lines = summary_from_log(Path(args.log))
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    out = {
        "source": f"recorded {time.strftime('%Y-%m-%d')} by bench/figures.py record smollm2 from {run_dir} and "
        f"the printed summary in {args.log}",
        "recipe": f"recipes/{recipe['name']}.yaml",
        "wall_seconds": round(args.wall_seconds),
        "stage_seconds": {s: round(v["seconds"]) for s, v in manifest.items() if v.get("seconds")},
        "summary": lines,
        "serve": serve_figures(run_dir / "serve" / "bench.json"),
        # what the reading in the README states the run against: its gate and its steps
        "gate": {k: recipe["eval"]["gate"][k] for k in ("criteria", "min_acceptance_rate")},
        "max_steps": recipe["train"]["max_steps"],
    }
    if args.note:
        out["note"] = args.note
    if args.rerun_seconds is not None:  # the log is of a later run that redid only some stages
        # NOTE: the manifest now times that run's stages (skips and cache hits included): the per-stage
        # seconds stay those of the full run recorded before, whose wall time --wall-seconds repeats.
        full = result(name)
        if full["wall_seconds"] != round(args.wall_seconds):
            raise SystemExit(
                f"--wall-seconds {args.wall_seconds:.0f}: the recorded full run took {full['wall_seconds']}"
            )
        ran = re.search(r"ran: ([^;]*);", lines[0])[1].split(", ")
        out["stage_seconds"] = full["stage_seconds"]
        out["full_run_source"] = full.get("full_run_source", full["source"])
        out["source"] += "; per-stage seconds and wall time from the full run (full_run_source)"
        out["rerun"] = {"why": args.rerun_why, "stages": ran, "wall_seconds": round(args.rerun_seconds)}
    write_result(name, out)


def serve_figures(bench_file: Path) -> dict:
    """Per setup of a run's bench.json: output tokens/s per concurrency, acceptance where a draft ran."""
    setups = json.loads(bench_file.read_text())["setups"]
    return {
        name: {
            "output_tokens_per_s": {c: round(v["output_tokens_per_s"], 2) for c, v in row["levels"].items()},
            "acceptance_rate": row.get("acceptance_rate"),
            "mean_acceptance_length": row.get("mean_acceptance_length"),
        }
        for name, row in setups.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if any block is out of date"
    )
    sub = parser.add_subparsers(dest="action")
    record = sub.add_parser("record", help="rewrite a result file from a finished run").add_subparsers(
        dest="what", required=True
    )
    demo = record.add_parser("demo", help="bench/results/demo.json from a finished `make demo` run directory")
    demo.add_argument("run_dir")
    demo.add_argument("--log", help="the output of `make demo`: its printed summary is taken verbatim")
    demo.add_argument("--fresh-clone-seconds", type=float, help="wall time of `make demo` on a fresh clone")
    demo.add_argument("--note", help="a note on the fresh-clone time")
    demo.add_argument("--source", help="where the run came from (default: the run directory and date)")
    tests = record.add_parser(
        "tests", help="bench/results/tests.json from the output of a fresh-clone make test"
    )
    tests.add_argument(
        "--log", required=True, help="the output of `make test` (pytest's closing line is read)"
    )
    tests.add_argument(
        "--total-seconds", type=float, required=True, help="wall time of `make test`, setup included"
    )
    tests.add_argument("--commit", help="the commit tested")
    tests.add_argument("--note", help="a note on the wall time")
    serve = record.add_parser(
        "serve", help="bench/results/serve_bench.json from a run's bench.json and gate.json"
    )
    serve.add_argument("run_dir")
    serve.add_argument("--command", help="the `distill bench serve` command that ran")
    smollm2 = record.add_parser("smollm2", help="bench/results/smollm2.json from a finished real-teacher run")
    smollm2.add_argument("run_dir")
    smollm2.add_argument(
        "--name", default="smollm2", help="the result file's name (smollm2_prune: the prune recipe)"
    )
    smollm2.add_argument("--log", required=True, help="the output of `distill run recipes/smollm2-135m.yaml`")
    smollm2.add_argument(
        "--wall-seconds", type=float, required=True, help="the wall time of a run of every stage"
    )
    smollm2.add_argument("--rerun-seconds", type=float,
                         help="--log is of a later run that redid some stages (a recipe change): its wall time")  # fmt: skip
    smollm2.add_argument("--rerun-why", default="", help="what changed before that later run")
    smollm2.add_argument("--note", default="", help="shown above the figures (how the run was made)")
    args = parser.parse_args()
    if args.action == "record":
        recorders = {
            "demo": record_demo,
            "tests": record_tests,
            "serve": record_serve,
            "smollm2": record_smollm2,
        }
        recorders[args.what](args)
        return 0
    return main_write(args.check)


if __name__ == "__main__":
    sys.exit(main())

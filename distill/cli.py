"""The `distill` command. Stages are plain functions; this module only parses arguments and calls them.

Errors are one line on stderr with a non-zero exit status; `--debug` (anywhere on the line) shows the
full traceback instead.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
from pathlib import Path

from distill import __version__
from distill.errors import DistillError
from distill.processes import Terminated, handle_termination


class Parser(argparse.ArgumentParser):
    """argparse with the project's error style: one line, exit status 1."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(1)


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file (see recipes/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4")


def _training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    p.add_argument("--overwrite", action="store_true", help="discard earlier checkpoints and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="distill",
        description="Distil a large language model into a small student: teacher generation (vLLM), "
        "training (Accelerate/DeepSpeed/PEFT), quantization (llm-compressor), gating (lm-eval), serving (vLLM).",
    )
    parser.add_argument("--version", action="version", version=f"distill {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    config = sub.add_parser("config", help="inspect recipes").add_subparsers(dest="action", required=True)
    show = config.add_parser("show", help="print the resolved recipe (defaults and overrides applied)")
    _recipe_args(show)
    show.set_defaults(func=cmd_config_show)
    config.add_parser("fields", help="every recipe field with its default and meaning").set_defaults(
        func=cmd_config_fields
    )

    p = sub.add_parser("prepare", help="build the corpus, tokenizer and token arrays")
    _recipe_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("pretrain", help="pretrain (or reuse) the embedded tiny teacher")
    _recipe_args(p)
    _training_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("train", help="train the student (train.loss=ce: the SFT baseline)")
    _recipe_args(p)
    _training_args(p)
    p.add_argument(
        "--print-launch",
        action="store_true",
        help="print the `accelerate launch` command train.distributed needs, and exit",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="the teacher writes the teacher store (sample or score mode)")
    _recipe_args(p)
    p.add_argument("--shard", metavar="I/N", help="process only shards with index I modulo N (0-based)")
    p.add_argument("--out", help="store directory (default <run>/teacher or <run>/teacher.shard-I-of-N)")
    p.add_argument("--overwrite", action="store_true", help="replace a store made with other settings")
    p.add_argument(
        "--split",
        choices=("train", "validation", "heldout"),
        default="train",
        help="validation: the teacher scores held-out blocks into <run>/teacher-validation "
        "(the students' validation KL); heldout: the teacher answers the held-out data.prompts into "
        "<run>/teacher-heldout (eval.teacher_match: instructions)",
    )
    p.set_defaults(func=cmd_generate)

    store = sub.add_parser("store", help="inspect, verify and merge teacher stores").add_subparsers(
        dest="action", required=True
    )
    p = store.add_parser("info", help="manifest summary: rows, tokens, bytes/token, teacher")
    p.add_argument("dir")
    p.set_defaults(func=cmd_store_info)
    p = store.add_parser("verify", help="check every shard against its checksum")
    p.add_argument("dir")
    p.set_defaults(func=cmd_store_verify)
    p = store.add_parser("merge", help="join --shard I/N stores into one")
    p.add_argument("out")
    p.add_argument("inputs", nargs="+")
    p.set_defaults(func=cmd_store_merge)

    p = sub.add_parser(
        "eval",
        help="lm-eval on the teacher and the students, then the quality gate (exit 3 when it fails)",
    )
    p.add_argument("recipe", help="recipe YAML file, or a run directory (its recipe.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. eval.limit=50")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="also evaluate (and gate) this model as a student; repeatable",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "quantize", help="llm-compressor: the student as compressed-tensors models (quant/<scheme>/)"
    )
    p.add_argument("recipe", help="recipe YAML file, or a run directory (its recipe.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    p.add_argument(
        "--scheme",
        action="append",
        choices=("w8a8", "w4a16", "fp8"),
        help="only this scheme (repeatable; default: quantize.schemes)",
    )
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser(
        "serve", help="vLLM's OpenAI-compatible server: the student, or the teacher with it as draft"
    )
    p.add_argument(
        "recipe",
        nargs="?",
        help="recipe YAML file, or a run directory (its recipe.yaml); not with --promoted",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. serve.port=9000")
    p.add_argument("--promoted", metavar="NAME[@VERSION]", help="serve a promoted student from the registry")
    p.add_argument("--registry", help="registry directory (default: $DISTILL_REGISTRY or ./registry)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--student", action="store_true", help="serve the student alone")
    which.add_argument("--draft", action="store_true", help="serve the teacher with the student as its draft")
    p.add_argument(
        "--quant", metavar="SCHEME", help="the quantized student quant/SCHEME instead of the student"
    )
    p.add_argument("--dry-run", action="store_true", help="print the server command (GPU form) and exit")
    p.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="action", required=True)
    p = bench.add_parser(
        "serve",
        help="vLLM serving benchmark: teacher alone, with the distilled and an undistilled draft, the "
        "student (and its quantized forms) alone; throughput, TTFT, ITL, speculative acceptance",
    )
    p.add_argument("recipe", help="recipe YAML file, or a run directory (its recipe.yaml)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. serve.bench.requests=32"
    )
    p.add_argument("--url", help="bench this running OpenAI-compatible server instead of starting the setups")
    p.set_defaults(func=cmd_bench_serve)

    p = sub.add_parser("promote", help="register a run's student that passed the gate (exit 3 when refused)")
    p.add_argument("recipe", help="a run directory, or its recipe YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides (with a recipe)")
    p.add_argument("--name", help="registry name (default: the run's name)")
    p.add_argument("--force", action="store_true", help="promote although the gate did not pass")
    p.add_argument("--reason", help="why --force (required with it; recorded in the entry)")
    p.add_argument(
        "--registry", help="registry directory (default: registry_dir, $DISTILL_REGISTRY or ./registry)"
    )
    p.set_defaults(func=cmd_promote)

    registry = sub.add_parser("registry", help="promoted students").add_subparsers(
        dest="action", required=True
    )
    p = registry.add_parser("list", help="every promoted version, one line each")
    p.add_argument("--registry", help="registry directory (default: $DISTILL_REGISTRY or ./registry)")
    p.set_defaults(func=cmd_registry_list)
    p = registry.add_parser("show", help="one entry (NAME: its newest version) as JSON")
    p.add_argument("ref", metavar="NAME[@VERSION]")
    p.add_argument("--registry", help="registry directory (default: $DISTILL_REGISTRY or ./registry)")
    p.set_defaults(func=cmd_registry_show)

    p = sub.add_parser("report", help="write the evaluation report (report.md, report.html) of a run")
    p.add_argument("run", help="a run directory (runs/<name>) or a recipe YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides (with a recipe)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "run", help="every stage of a recipe, skipping finished ones (exit 3 when the gate fails)"
    )
    _recipe_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--from", dest="start", metavar="STAGE", help="rerun this stage and every one after it")
    p.add_argument("--only", metavar="STAGE", help="run only this stage")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan and the commands (accelerate launch, vllm serve)",
    )
    p.set_defaults(func=cmd_run)

    return parser


def _load(args, models: bool = True):
    """The recipe, with its GGUF models converted and its student cut made (distill.models.local_models;
    a dry run only checks them); `models=False` leaves the model fields as written."""
    from distill.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if not models:
        return recipe
    from distill.models import local_models

    dry = getattr(args, "dry_run", False) or getattr(args, "print_launch", False)
    return local_models(recipe, convert=not dry, log=lambda line: print(line, flush=True))


def cmd_config_show(args) -> int:
    from distill.config import recipe_to_yaml

    print(recipe_to_yaml(_load(args, models=False)), end="")
    return 0


def cmd_config_fields(args) -> int:
    from distill.config import field_docs

    for path, default, doc in field_docs():
        print(f"{path:<40} {default:<22} {doc}" if default else f"{path:<40} {'':<22} [{doc}]")
    return 0


def cmd_prepare(args) -> int:
    from distill.stages.prepare import prepare

    data = prepare(_load(args))
    for key, value in data.summary().items():
        print(f"{key}: {value}")
    return 0


def cmd_pretrain(args) -> int:
    from distill.pipeline import open_run
    from distill.stages.pretrain import pretrain

    run = open_run(_load(args), teacher=None)
    t = pretrain(run, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"teacher: {t.path}{' (reused)' if t.reused else ''}")
    print(
        f"held-out loss {t.test_loss:.3f} (perplexity {t.test_perplexity:.1f}); uniform {t.uniform_loss:.3f}"
    )
    return 0


def cmd_train(args) -> int:
    from distill.models import check_model_dir
    from distill.pipeline import open_run
    from distill.run import Run
    from distill.stages.train import is_main_process, launch, needs_launch, train, train_teacher

    recipe = _load(args)
    if recipe.student.model and not args.print_launch:  # before any data is prepared or process launched
        check_model_dir(recipe.student.model, "student.model")
    if args.print_launch or needs_launch(recipe):
        if recipe.train.distributed.backend == "none":
            print("launch: none (train.distributed.backend=none trains in this process)")
            return 0
        # the launched processes get the same recipe and overrides; --overwrite is done here, once
        flags = [
            f
            for f, on in (
                ("--resume", args.resume),
                ("--no-progress", args.no_progress),
                ("--debug", args.debug),
            )
            if on
        ]
        # a dry run prints the command from the recipe alone (no data, no models: any machine)
        run = Run(recipe) if args.print_launch else open_run(recipe, train_teacher(recipe))
        return launch(
            run,
            ["train", args.recipe, *args.overrides, *flags],
            args.resume,
            args.overwrite,
            dry_run=args.print_launch,
        )
    run = open_run(recipe, train_teacher(recipe), progress=not args.no_progress)
    r = train(run, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    if is_main_process():
        kl = f", validation KL to the teacher {r.val_kl:.4f}" if r.val_kl is not None else ""
        print(f"student: {r.final_dir} ({r.steps} steps, validation loss {r.val_loss:.3f}{kl})")
        if r.val_acceptance is not None:
            start = f"{r.start_acceptance:.3f} at the start, " if r.start_acceptance is not None else ""
            print(
                f"expected acceptance as the teacher's draft (held-out prompts): {start}{r.val_acceptance:.3f}"
            )
    return 0


def cmd_generate(args) -> int:
    from distill.pipeline import open_run
    from distill.stages.generate import generate, parse_shard

    shard = parse_shard(args.shard) if args.shard else None
    store = generate(
        open_run(_load(args)),
        shard=shard,
        out=Path(args.out) if args.out else None,
        overwrite=args.overwrite,
        split=args.split,
    )
    _print_summary(store.summary())
    return 0


def _print_summary(summary: dict) -> None:
    for key, value in summary.items():
        print(f"{key}: {value}")


def cmd_store_info(args) -> int:
    from distill.store import TeacherStore

    _print_summary(TeacherStore(args.dir).summary())
    return 0


def cmd_store_verify(args) -> int:
    from distill.store import TeacherStore

    store = TeacherStore(args.dir)
    store.verify()
    print(f"ok: {len(store.shards)} shards match their checksums")
    return 0


def cmd_store_merge(args) -> int:
    from distill.store import merge_stores

    store = merge_stores(Path(args.out), [Path(p) for p in args.inputs])
    _print_summary(store.summary())
    return 0


def cmd_eval(args) -> int:
    from distill.gate import failing
    from distill.pipeline import open_run
    from distill.stages.evaluate import GATE_FAILED, evaluate

    extra = {}
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise DistillError(f"--model {item}: expected NAME=DIR")
        extra[name] = path
    from distill.stages.report import report

    run = open_run(_load_run(args))
    decision = evaluate(run, extra, log=lambda line: print(line, flush=True))
    verdict = "PASSED" if decision["passed"] else "FAILED"
    if not decision["checks"] and not decision["errors"]:
        print(f"gate: {verdict} (eval.gate.criteria is empty: nothing was checked)")
    else:
        checks = f"{len(decision['checks'])} checks, noise: {decision['noise']}, z {decision['z']}"
        print(f"gate: {verdict} ({checks})")
    for line in failing(decision):
        print(f"  {line}")
    print(f"report: {report(run.path)}")
    return 0 if decision["passed"] else GATE_FAILED


def _load_run(args):
    """A recipe file, or a run directory whose recipe.yaml the stages wrote. A run directory is the run,
    wherever it is now: one that was moved or copied works there, not where its recipe first ran."""
    from distill.config import load_recipe

    run = Path(args.recipe)
    if not run.is_dir():
        return _load(args)
    here = [f"runs_dir={json.dumps(str(run.resolve().parent))}", f"name={json.dumps(run.resolve().name)}"]
    from distill.models import local_models

    dry = getattr(args, "dry_run", False)
    recipe = load_recipe(run / "recipe.yaml", [*here, *args.overrides])
    return local_models(recipe, convert=not dry, log=lambda line: print(line, flush=True))


def cmd_quantize(args) -> int:
    from distill.pipeline import open_run
    from distill.stages.quantize import quantize
    from distill.vllm.kernels import scheme_of, serving_note, serving_problem

    done = quantize(
        open_run(_load_run(args), teacher=None), args.scheme, log=lambda line: print(line, flush=True)
    )
    for scheme, path in done.items():
        problem, note = serving_problem(scheme_of(path)), serving_note(scheme_of(path))
        status = (
            f"note: {problem}" if problem else "vLLM can serve it here" + (f"; note: {note}" if note else "")
        )
        print(f"{scheme}: {path} ({status})")
    return 0


def cmd_serve(args) -> int:
    from distill.pipeline import open_run
    from distill.run import Run
    from distill.stages.serve import serve, student_model

    if args.promoted:
        from distill.config import registry_path
        from distill.stages.promote import resolve, served_recipe, student_of
        from distill.vllm.kernels import scheme_of, serving_problem

        if args.recipe is not None:  # `serve --promoted NAME key=value`: the first override lands here
            if "=" not in args.recipe:
                raise DistillError("--promoted serves from the registry: give no recipe or run directory")
            args.overrides = [args.recipe, *args.overrides]
        entry = resolve(registry_path(args.registry), args.promoted)
        recipe = served_recipe(entry, args.overrides)
        student = student_of(entry, args.quant)
        problem = None if args.dry_run else serving_problem(scheme_of(student))
        if problem:
            raise DistillError(problem)
        print(f"promoted: {entry}", flush=True)
    else:
        if args.recipe is None:
            raise DistillError("serve needs a recipe, a run directory, or --promoted NAME[@VERSION]")
        recipe = _load_run(args)
        student = student_model(Run(recipe), args.quant, check=not args.dry_run)
    if not args.dry_run:
        from distill.vllm.kernels import scheme_of, serving_note

        note = serving_note(scheme_of(student))
        if note:
            print(f"note: {note}", flush=True)
    mode = "draft" if args.draft else "student"
    # the teacher only for --draft; a dry run prints the GPU command with teacher.model as it is
    needs_teacher = args.draft and not (args.dry_run and recipe.teacher.model)
    run = open_run(recipe) if needs_teacher else Run(recipe)
    return serve(run, mode, student, dry_run=args.dry_run, log=lambda line: print(line, flush=True))


def cmd_bench_serve(args) -> int:
    from distill.pipeline import open_run, resolve_teacher
    from distill.stages.bench import available_setups, bench, comparison

    run = open_run(_load_run(args), teacher=None)
    if args.url is None:
        available_setups(run)  # a run without a student is refused before the teacher is resolved
        run = resolve_teacher(run)
    result = bench(run, url=args.url, log=lambda line: print(line, flush=True))
    print("\n".join(comparison(result)))
    print(f"bench: {run.bench_file}")
    if args.url is None and run.gate_file.exists():
        from distill.artifacts import read_json
        from distill.stages.evaluate import GATE_FAILED
        from distill.stages.report import report

        gate = read_json(run.gate_file)
        print(f"report: {report(run.path)}")
        if not gate.get("passed"):
            from distill.gate import failing

            print("gate: FAILED")
            for line in failing(gate):
                print(f"  {line}")
            return GATE_FAILED
        print("gate: PASSED")
    return 0


def cmd_promote(args) -> int:
    from distill.pipeline import open_run
    from distill.run import Run
    from distill.stages.promote import promote

    recipe = _load_run(args)
    run = Run(recipe)
    if (run.student / "config.json").exists() and not (run.store / "manifest.json").exists():
        run = open_run(recipe, teacher="ready")  # the teacher's identity then comes from the model itself
    entry = promote(
        run,
        name=args.name,
        force=args.force,
        reason=args.reason,
        registry=Path(args.registry) if args.registry else None,
    )
    forced = f" (gate overridden: {entry['reason']})" if entry["forced"] else ""
    if entry.get("reused"):
        forced += " (already promoted: the same student)"
    print(f"promoted: {entry['ref']}{forced}")
    print(f"  student: {entry['student']}")
    for scheme, path in entry["quantized"].items():
        print(f"  {scheme}: {path}")
    print(
        f"serve it: distill serve --promoted {entry['ref']} --student   (or --draft: the teacher drafting with it)"
    )
    return 0


def cmd_registry_list(args) -> int:
    from distill.config import registry_path
    from distill.stages.promote import entries

    registry = registry_path(args.registry)
    rows = entries(registry)
    if not rows:
        print(f"registry {registry}: empty")
        return 0
    for e in rows:
        gate = "gate passed" if e["gate"]["passed"] else f"FORCED: {e['reason']}"
        quant = ",".join(e["quantized"]) or "-"
        print(f"{e['ref']:<24} {e['promoted_at']}  {gate:<22} quant {quant:<12} {e['run']}")
    return 0


def cmd_registry_show(args) -> int:
    import json

    from distill.artifacts import read_json
    from distill.config import registry_path
    from distill.stages.promote import resolve

    print(json.dumps(read_json(resolve(registry_path(args.registry), args.ref) / "entry.json"), indent=2))
    return 0


def cmd_report(args) -> int:
    from distill.stages.report import report

    run = Path(args.run)
    if run.is_dir():
        if args.overrides:
            raise DistillError("overrides apply to a recipe, not to a run directory")
        run_dir = run
    else:
        from distill.config import load_recipe

        run_dir = load_recipe(run, args.overrides).run_dir
    path = report(run_dir)
    print(f"report: {path} (and {path.with_suffix('.md')})")
    return 0


def cmd_run(args) -> int:
    from distill.artifacts import read_json
    from distill.pipeline import run, summary
    from distill.run import RunDir
    from distill.stages.evaluate import GATE_FAILED

    recipe = _load(args)
    log = lambda line: print(line, flush=True)  # noqa: E731
    result = run(
        recipe, start=args.start, only=args.only, dry_run=args.dry_run, progress=not args.no_progress, log=log
    )
    if args.dry_run:
        return 0
    print("\n".join(summary(recipe, result)))
    gate = RunDir(recipe.run_dir).gate_file
    if gate.exists() and not read_json(gate).get("passed"):
        return GATE_FAILED
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow flags (`generate R.yaml --shard 0/2 a.b=1`); argparse stops collecting at a flag.
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.debug = debug
    # Our own bar shows training progress; the per-file bars of model loading and saving are noise.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    handle_termination()  # SIGTERM unwinds like Ctrl-C: every server and engine started is stopped
    from distill.training.launch import inside_launch

    if inside_launch():
        # A launched process that dies in native code (gloo, DeepSpeed) shows only "Signal 6" in the
        # launcher's summary; print where each of its threads was instead.
        faulthandler.enable(all_threads=True)
    try:
        return args.func(args)
    except Terminated as exc:
        print(f"distill: terminated ({exc}); servers and engines it started were stopped", file=sys.stderr)
        return exc.exit_code
    except DistillError as exc:
        if debug:
            raise
        print(f"distill: error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("distill: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure still reads as one line; --debug shows where
        if debug:
            raise
        print(
            f"distill: error: {type(exc).__name__}: {_one_line(str(exc))} (--debug shows the traceback)",
            file=sys.stderr,
        )
        return 1


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())

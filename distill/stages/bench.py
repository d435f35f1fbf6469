"""`distill bench serve`: what the distilled draft buys at serving time, measured on vLLM's own server.

Each setup is served by a real `vllm serve` (started here, or one already running: `--url`, or per
setup serve.bench.servers) and
loaded by vLLM's own serving benchmark (`vllm.benchmarks.serve.benchmark`, what `vllm bench serve`
runs): held-out prompts (openings of the corpus's test blocks, as token ids), a fixed number of generated
tokens (EOS ignored, so every setup does the same work), all requests at once with at most
`concurrency` in flight, at each concurrency level of the recipe. Per level, vLLM's figures: throughput
(output tokens/s, requests/s), time to first token, inter-token latency (the gaps between streamed
chunks, which under speculative decoding may carry several tokens) and time per output token (p50/p95,
mean), completed and failed requests; its whole result is kept beside them (`vllm`). On top, what vLLM
does not give: the speculative-decoding acceptance from the server's /metrics counters per level and
per setup (rate = accepted / drafted tokens; mean acceptance length = 1 + accepted / drafts, the tokens
one teacher step yields), the models' fingerprints and sizes, and the gate. The setups:

- `teacher`: the teacher alone (the baseline);
- `teacher+student`: the teacher with the distilled student as its draft;
- `teacher+baseline`: the teacher with an undistilled draft of the same size (serve.bench.baseline, else
  the run's SFT baseline (<run>/baseline), else the initial student);
- `student`, `student-<scheme>`: the student alone, unquantized and per quant/<scheme>.

Results go to <run>/serve/bench.json (vLLM's printout per setup to serve/logs/<setup>.bench.log); the
acceptance of `teacher+student` joins the gate (eval.gate.min_acceptance_rate) and the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from distill import gate
from distill.artifacts import atomic_write_json
from distill.config import RecipeConfig
from distill.errors import DistillError
from distill.gate import DISTILLED_DRAFT, bench_in_order
from distill.heldout import serving_prompts
from distill.run import Run, RunDir
from distill.vllm.engine import draft_problem

SPEC_COUNTERS = {
    "drafts": "vllm:spec_decode_num_drafts_total",
    "draft_tokens": "vllm:spec_decode_num_draft_tokens_total",
    "accepted_tokens": "vllm:spec_decode_num_accepted_tokens_total",
}


@dataclass(frozen=True)
class Setup:
    name: str
    mode: str  # teacher | draft | student (vllm.engine.serving_engine_args' modes)
    model: Path | None  # the draft, or the student served alone; None for the teacher alone


def initial_student(run: Run) -> Path:
    """The student before any training (distill.models.initial_student), under the run's serve/."""
    from distill.models import initial_student as build

    return build(run.recipe, run.student_tokenizer, run.serve_dir / "initial-student")


def baseline_draft(run: Run) -> Path:
    given = run.recipe.serve.bench.baseline
    if given is None:
        sft = run.baseline  # the SFT baseline `distill run` trains
        return sft if (sft / "config.json").exists() else initial_student(run)
    path = Path(given)
    if (RunDir(path).student / "config.json").exists():  # a run directory (e.g. the SFT baseline's)
        path = RunDir(path).student
    if not (path / "config.json").exists():
        raise DistillError(
            f"serve.bench.baseline: {given} is neither a model directory nor a run directory with a "
            "trained student (student/final)"
        )
    return path


def available_setups(run: Run) -> list[Setup]:
    """Every setup of this run, in the order of the table; a missing student is a clear error."""
    from distill.vllm.kernels import scheme_of, serving_problem

    student = run.student
    if not (student / "config.json").exists():
        raise DistillError(f"no student to bench at {student} (run `distill train` first)")
    out = [Setup("teacher", "teacher", None)]
    if draft_problem(student, run.teacher if run.has_teacher else None) is None:  # not across tokenizers
        out += [
            Setup(DISTILLED_DRAFT, "draft", student),
            Setup("teacher+baseline", "draft", None),  # resolved only when chosen (it may be built)
        ]
    out.append(Setup("student", "student", student))
    for quant in run.quantized_students():  # finished ones only, never a killed one's temporary
        if serving_problem(scheme_of(quant)) is None:
            out.append(Setup(f"student-{quant.name}", "student", quant))
    return out


def chosen_setups(run: Run, running: dict[str, str] | None = None) -> list[Setup]:
    setups = available_setups(run)
    wanted = run.recipe.serve.bench.setups
    names = [s.name for s in setups]
    unknown = [name for name in running or {} if name not in (wanted if wanted is not None else names)]
    if unknown:
        raise DistillError(
            f"serve.bench.servers.{unknown[0]}: not a setup this bench runs "
            f"({', '.join(wanted if wanted is not None else names)})"
        )
    if wanted is not None:
        unknown = [w for w in wanted if w not in names]
        if unknown:
            problem = draft_problem(run.student, run.teacher if run.has_teacher else None)
            why = f": {problem}" if problem and DISTILLED_DRAFT in unknown else ""
            raise DistillError(
                f"serve.bench.setups: {', '.join(unknown)} not in this run's setups ({', '.join(names)}){why}"
            )
        setups = [s for s in setups if s.name in wanted]
    return [Setup(s.name, s.mode, baseline_draft(run)) if s.name == "teacher+baseline" else s for s in setups]


# --------------------------------------------------------------------------- the load: vLLM's benchmark

# bench.json's figures per level, each one of vLLM's (the left names are what the report, the registry
# and the pipeline read).
FROM_VLLM = {
    "seconds": "duration",
    "output_tokens": "total_output_tokens",
    "output_tokens_per_s": "output_throughput",
    "requests_per_s": "request_throughput",
    "ttft_ms_p50": "median_ttft_ms",
    "ttft_ms_p95": "p95_ttft_ms",
    "itl_ms_p50": "median_itl_ms",
    "itl_ms_p95": "p95_itl_ms",
    "tpot_ms_p50": "median_tpot_ms",
    "tpot_ms_mean": "mean_tpot_ms",
}
# vLLM's per-request lists, which `vllm bench serve --save-result` also leaves out (without --save-detailed)
PER_REQUEST = ("input_lens", "output_lens", "start_times", "ttfts", "itls", "generated_texts", "errors")


@dataclass(frozen=True)
class Target:
    """A running server as vLLM's benchmark addresses it."""

    url: str  # without /v1
    served: str  # the model name it answers to
    tokenizer: str  # the served model's tokenizer (a directory)
    key: str | None


def _headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def spec_counters(url: str, key: str | None = None) -> dict[str, float]:
    """The speculative-decoding counters of /metrics, summed over their label sets (0 without a draft)."""
    request = urllib.request.Request(f"{url}/metrics", headers=_headers(key))
    with urllib.request.urlopen(request, timeout=30) as resp:
        text = resp.read().decode()
    totals = dict.fromkeys(SPEC_COUNTERS, 0.0)
    for line in text.splitlines():
        for field, name in SPEC_COUNTERS.items():
            if line.startswith(name) and line[len(name)] in " {":
                totals[field] += float(line.rsplit(" ", 1)[1])
    return totals


def acceptance(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    d = {k: after[k] - before[k] for k in SPEC_COUNTERS}
    if d["draft_tokens"] <= 0:
        return {"acceptance_rate": None, "mean_acceptance_length": None, "draft_tokens": 0}
    return {
        "acceptance_rate": d["accepted_tokens"] / d["draft_tokens"],
        "mean_acceptance_length": 1 + d["accepted_tokens"] / d["drafts"],
        "draft_tokens": int(d["draft_tokens"]),
    }


def sample_requests(prompts: list[list[int]], requests: int, max_tokens: int) -> list:
    """vLLM's benchmark requests: the held-out prompts in turn (token ids), each with its own seed."""
    from vllm.benchmarks.datasets import SampleRequest

    return [
        SampleRequest(
            prompt=prompts[i % len(prompts)],
            prompt_len=len(prompts[i % len(prompts)]),
            expected_output_len=max_tokens,
            request_overrides={"seed": i},  # reproducible samples when temperature > 0
        )
        for i in range(requests)
    ]


def vllm_benchmark(target: Target, tokenizer, requests: list, concurrency: int, temperature: float,
                   printed: TextIO) -> dict:  # fmt: skip
    """One run of vLLM's serving benchmark (`vllm bench serve` without its CLI): all `requests` at once
    (request rate inf), at most `concurrency` in flight, EOS ignored. Its printout goes to `printed`."""
    from vllm.benchmarks.serve import TaskType, benchmark

    with contextlib.redirect_stdout(printed):
        return asyncio.run(
            benchmark(
                task_type=TaskType.GENERATION,
                endpoint_type="openai",
                api_url=f"{target.url}/v1/completions",
                base_url=target.url,
                model_id=target.served,
                model_name=target.served,
                tokenizer=tokenizer,  # NOTE: without one vLLM reports no latencies (tokens: from usage)
                input_requests=requests,
                logprobs=None,
                request_rate=float("inf"),
                burstiness=1.0,
                disable_tqdm=True,
                num_warmups=0,
                profile=False,
                selected_percentile_metrics=["ttft", "tpot", "itl", "e2el"],
                selected_percentiles=[50, 95, 99],
                ignore_eos=True,
                goodput_config_dict={},
                max_concurrency=concurrency,
                lora_modules=None,
                extra_headers=_headers(target.key) or None,
                extra_body={"temperature": temperature},
                # NOTE: no test request inside a level, so the /metrics deltas around it count its requests only
                ready_check_timeout_sec=0,
            )
        )


def level_row(result: dict) -> dict:
    """One level of bench.json: our names for vLLM's figures, and vLLM's result itself under `vllm`."""
    errors = sorted({e.strip().splitlines()[-1][:200] for e in result["errors"] if e})
    return {
        "requests": result["completed"] + result["failed"],
        "errors": result["failed"],
        "error_examples": errors[:3],
        **{ours: result[theirs] for ours, theirs in FROM_VLLM.items()},
        "vllm": {k: v for k, v in result.items() if k not in PER_REQUEST},
    }


def drive(target: Target, prompts: list[list[int]], recipe: RecipeConfig, label: str, printed: TextIO,
          log=print) -> dict:  # fmt: skip
    """Every concurrency level against one running server; acceptance per level and in all."""
    from vllm.tokenizers import get_tokenizer

    from distill.vllm.server import healthy

    cfg = recipe.serve.bench
    tokenizer = get_tokenizer(target.tokenizer)
    requests = sample_requests(prompts, cfg.requests, cfg.max_tokens)
    vllm_benchmark(target, tokenizer, requests[:1], 1, cfg.temperature, printed)  # warm-up, not counted
    first = before = spec_counters(target.url, target.key)
    levels = {}
    for concurrency in cfg.concurrency:
        result = vllm_benchmark(target, tokenizer, requests, concurrency, cfg.temperature, printed)
        after = spec_counters(target.url, target.key)
        row = levels[str(concurrency)] = {**level_row(result), **acceptance(before, after)}
        before = after
        rate = row["acceptance_rate"]
        log(
            f"bench: {label} c={concurrency}: {row['output_tokens_per_s']:.1f} tok/s, "
            f"TTFT p50 {row['ttft_ms_p50']:.2f} ms, ITL p50 {row['itl_ms_p50']:.2f} ms, "
            f"TPOT p50 {row['tpot_ms_p50']:.2f} ms"
            + (f", acceptance {rate:.3f}" if rate is not None else "")
            + (f", {row['errors']} errors" if row["errors"] else "")
        )
    return {"levels": levels, **acceptance(first, before), "healthy_after": healthy(target.url)}


def running_target(url: str, key: str | None, run: Run) -> Target:
    """The server at `url` (`--url`): its first model, and that model's tokenizer when the directory it
    serves is on this machine, else the recipe's (the one the prompts' token ids are in)."""
    from vllm.benchmarks.serve import get_first_model_from_server

    served, root = asyncio.run(get_first_model_from_server(url, _headers(key) or None))
    local = Path(root)
    tokenizer = local if (local / "tokenizer_config.json").exists() else run.data.tokenizer_dir
    return Target(url, served, str(tokenizer), key)


def running_setup(setup: Setup, model: str, url: str, key: str | None) -> Target:
    """The server already running `setup` at `url` (serve.bench.servers): it must serve `model` (the
    directory its /v1/models names as the root of its first model)."""
    from vllm.benchmarks.serve import get_first_model_from_server

    url = url.rstrip("/").removesuffix("/v1")
    where = f"serve.bench.servers.{setup.name}"
    try:
        served, root = asyncio.run(get_first_model_from_server(url, _headers(key) or None))
    except (RuntimeError, ValueError, OSError) as exc:  # vLLM's message is several lines: the first
        raise DistillError(f"{where}: no vLLM server answers at {url} ({str(exc).splitlines()[0]})") from exc
    if Path(root).resolve() != Path(model).resolve():
        raise DistillError(f"{where}: the server at {url} serves {root}, not the setup's model {model}")
    return Target(url, served, str(root), key)


# --------------------------------------------------------------------------- the stage


def bench(run: Run, url: str | None = None, log=print) -> dict:
    """Bench every chosen setup (or the server at `url`), write <run>/serve/bench.json, and have the gate
    add the distilled draft's acceptance to the verdict. Returns bench.json's content."""
    from distill.models import model_fingerprint
    from distill.vllm.engine import serving_engine_args
    from distill.vllm.server import VllmServer

    started = time.perf_counter()
    recipe = run.recipe
    key = os.environ.get(recipe.serve.api_key_env)
    prompts = serving_prompts(recipe.serve.bench, run.data.tokens_dir)
    out = run.serve_dir
    (out / "logs").mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    if url is not None:
        url = url.rstrip("/").removesuffix("/v1")
        target = running_target(url, key, run)
        log(f"bench: the running server at {url} ({target.served})")
        with open(out / "logs" / "server.bench.log", "w") as printed:
            results["server"] = {"url": url, **drive(target, prompts, recipe, "server", printed, log)}
    else:
        running = recipe.serve.bench.servers
        planned = [
            (s, serving_engine_args(recipe, s.mode, s.model, None if s.mode == "student" else run.teacher))
            for s in chosen_setups(run, running)
        ]
        # the running servers are checked before any server starts: a wrong URL costs no engine start
        targets = {
            s.name: running_setup(s, args["model"], running[s.name], key)
            for s, args in planned
            if s.name in running
        }
        for setup, args in planned:
            served = "student" if setup.mode == "student" else "teacher"
            logs = out / "logs"
            if setup.name in targets:
                target = targets[setup.name]
                log(f"bench: {setup.name}: the running server at {target.url} ({args['model']}"
                    + (f", draft {setup.model}" if setup.mode == "draft" else "") + ")")  # fmt: skip
                with open(logs / f"{setup.name}.bench.log", "w") as printed:
                    row = {"url": target.url, **drive(target, prompts, recipe, setup.name, printed, log)}
                if setup.mode == "draft" and row["acceptance_rate"] is None:
                    raise DistillError(
                        f"serve.bench.servers.{setup.name}: the server at {target.url} drafted no tokens "
                        f"during the benchmark; it is not serving {args['model']} with a draft model"
                    )
            else:
                log(f"bench: {setup.name}: starting vllm serve ({args['model']}"
                    + (f", draft {setup.model}" if setup.mode == "draft" else "") + ")")  # fmt: skip
                with (
                    VllmServer(args, logs / f"{setup.name}.log", served_name=served, api_key=key) as server,
                    open(logs / f"{setup.name}.bench.log", "w") as printed,  # vLLM's benchmark printout
                ):
                    target = Target(server.url, served, args.get("tokenizer", args["model"]), key)
                    row = drive(target, prompts, recipe, setup.name, printed, log)
            model = setup.model if setup.model is not None else Path(args["model"])
            results[setup.name] = {
                "mode": setup.mode,
                "model": args["model"],
                "draft": str(setup.model) if setup.mode == "draft" else None,
                "fingerprint": model_fingerprint(model, recipe.cache_path),
                "bytes": sum(p.stat().st_size for p in Path(model).iterdir() if p.is_file()),
                **row,
            }
    cfg = recipe.serve.bench
    result = {
        "setups": results,
        "settings": {
            **cfg.model_dump(),
            "num_speculative_tokens": recipe.serve.num_speculative_tokens,
            "prompts": len(prompts),
        },
        "seconds": round(time.perf_counter() - started, 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(run.bench_file, result)
    if url is None:
        gate.write(run, recipe.eval.gate, recipe.cache_path)  # once eval has finished: its verdict and this
    return result


def comparison(bench: dict) -> list[str]:
    """The lines `distill bench serve` ends with: speed-up of each setup over the teacher alone, per level."""
    setups = bench["setups"]
    lines = []
    base = setups.get("teacher")
    for name, row in bench_in_order(setups):
        for level, values in sorted(row["levels"].items(), key=lambda kv: int(kv[0])):
            speed = values["output_tokens_per_s"]
            ratio = ""
            if base and name != "teacher" and base["levels"].get(level, {}).get("output_tokens_per_s"):
                ratio = f" ({speed / base['levels'][level]['output_tokens_per_s']:.2f}x the teacher)"
            lines.append(f"{name:<18} c={level:<3} {speed:8.1f} tok/s{ratio}")
        if row.get("acceptance_rate") is not None:
            lines.append(
                f"{name:<18} acceptance {row['acceptance_rate']:.3f}, "
                f"mean acceptance length {row['mean_acceptance_length']:.2f}"
            )
    return lines


# where the servers are and the key to them do not change what is measured: not in the stage's inputs
NOT_INPUTS = {"host": True, "port": True, "api_key_env": True, "bench": {"servers"}}


def pipeline_stages(recipe: RecipeConfig) -> list:
    """How `distill run` drives this stage (see distill.stages.Stage); its acceptance joins the gate."""
    import shlex

    from distill.stages import Stage, dump
    from distill.vllm.engine import serving_engine_args
    from distill.vllm.server import serve_command

    layout = RunDir(recipe.run_dir)

    def go(ctx, redo: bool) -> dict:
        bench(ctx.run(), log=ctx.log)
        return {"bench": str(layout.bench_file)}

    def plan(ctx) -> list[str]:
        student = layout.student
        # the plan names the tiny teacher instead of pretraining it to learn its cache path
        teacher = recipe.teacher.model or "<the pretrained tiny teacher>"
        setups = (
            ("teacher", None, "teacher"),
            ("draft", student, "teacher"),
            ("student", student, "student"),
        )
        return [
            shlex.join(
                serve_command(
                    serving_engine_args(recipe, mode, model, teacher, gpu=True),
                    recipe.serve.port,
                    served_name=name,
                )
            )  # fmt: skip
            for mode, model, name in setups
        ]

    return [
        Stage(
            "bench",
            {
                "serve": recipe.serve.model_dump(exclude=NOT_INPUTS),
                "gate": dump(recipe.eval.gate),
            },
            run=go,
            outputs=lambda ctx: [layout.bench_file],
            plan=plan,
            off=None if recipe.pipeline.bench else "pipeline.bench is false",
        )
    ]

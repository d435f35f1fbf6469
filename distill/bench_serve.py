"""`distill bench serve`: what the distilled draft buys at serving time, measured on vLLM's own server.

Each setup is served by a real `vllm serve` (started here, or one already running with `--url`) and
driven by streaming /v1/completions requests: held-out prompts (openings of the corpus's test blocks,
as token ids), a fixed number of generated tokens (EOS ignored, so every setup does the same work), at
each concurrency level of the recipe. Per level: throughput (output tokens/s, requests/s), time to first
token and inter-token latency (p50/p95; one "inter-token" gap is the gap between two streamed chunks,
which under speculative decoding may carry several tokens, as in vLLM's own benchmark), time per output
token, errors; and the speculative-decoding acceptance from the server's /metrics counters (rate =
accepted / drafted tokens; mean acceptance length = 1 + accepted / drafts, the tokens one teacher step
yields). The setups:

- `teacher`: the teacher alone (the baseline);
- `teacher+student`: the teacher with the distilled student as its draft;
- `teacher+baseline`: the teacher with an undistilled draft of the same size (serve.bench.baseline, else
  the run's SFT baseline (<run>/baseline), else the initial student);
- `student`, `student-<scheme>`: the student alone, unquantized and per quant/<scheme>.

Results go to <run>/serve/bench.json; the acceptance of `teacher+student` joins the gate
(eval.gate.min_acceptance_rate) and the report.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from distill.artifacts import atomic_write_json, begin_directory, commit_directory, read_json
from distill.config import RecipeConfig
from distill.errors import DistillError

SPEC_COUNTERS = {
    "drafts": "vllm:spec_decode_num_drafts_total",
    "draft_tokens": "vllm:spec_decode_num_draft_tokens_total",
    "accepted_tokens": "vllm:spec_decode_num_accepted_tokens_total",
}
DISTILLED_DRAFT = "teacher+student"


@dataclass(frozen=True)
class Setup:
    name: str
    mode: str  # teacher | draft | student (serve_engine_args' modes)
    model: Path | None  # the draft, or the student served alone; None for the teacher alone


def initial_student(recipe: RecipeConfig) -> Path:
    """The student before any training, as a model directory vLLM can load: student.model itself, or
    student.tiny built with train.seed (exactly what `distill train` starts from) saved once."""
    if recipe.student.model:
        return Path(recipe.student.model)
    out = recipe.run_dir / "serve" / "initial-student"
    if (out / "config.json").exists():
        return out
    from distill.models import build_tiny_llama
    from distill.prepare import prepare
    from distill.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(prepare(recipe).tokenizer_dir)
    tmp = begin_directory(out)
    build_tiny_llama(recipe.student.tiny, tokenizer, seed=recipe.train.seed).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    commit_directory(tmp, out)
    return out


def baseline_draft(recipe: RecipeConfig) -> Path:
    given = recipe.serve.bench.baseline
    if given is None:
        sft = recipe.run_dir / "baseline" / "final"  # the SFT baseline `distill run` trains
        return sft if (sft / "config.json").exists() else initial_student(recipe)
    path = Path(given)
    if (path / "student" / "final" / "config.json").exists():  # a run directory (e.g. the SFT baseline's)
        path = path / "student" / "final"
    if not (path / "config.json").exists():
        raise DistillError(
            f"serve.bench.baseline: {given} is neither a model directory nor a run directory with a "
            "trained student (student/final)"
        )
    return path


def available_setups(recipe: RecipeConfig) -> list[Setup]:
    """Every setup of this run, in the order of the table; a missing student is a clear error."""
    from distill.quantize import scheme_of, serving_problem

    student = recipe.run_dir / "student" / "final"
    if not (student / "config.json").exists():
        raise DistillError(f"no student to bench at {student} (run `distill train` first)")
    out = [
        Setup("teacher", "teacher", None),
        Setup(DISTILLED_DRAFT, "draft", student),
        Setup("teacher+baseline", "draft", None),  # resolved only when chosen (it may be built)
        Setup("student", "student", student),
    ]
    for config in sorted((recipe.run_dir / "quant").glob("*/config.json")):
        if serving_problem(scheme_of(config.parent)) is None:
            out.append(Setup(f"student-{config.parent.name}", "student", config.parent))
    return out


def chosen_setups(recipe: RecipeConfig) -> list[Setup]:
    setups = available_setups(recipe)
    wanted = recipe.serve.bench.setups
    if wanted is not None:
        names = [s.name for s in setups]
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise DistillError(
                f"serve.bench.setups: {', '.join(unknown)} not in this run's setups ({', '.join(names)})"
            )
        setups = [s for s in setups if s.name in wanted]
    return [
        Setup(s.name, s.mode, baseline_draft(recipe)) if s.name == "teacher+baseline" else s for s in setups
    ]


def held_out_prompts(recipe: RecipeConfig) -> list[list[int]]:
    from distill.onpolicy import Prompts
    from distill.prepare import prepare

    cfg = recipe.serve.bench
    prompts = Prompts.from_blocks(prepare(recipe).tokens_dir / "test.npy", cfg.prompt_tokens, cfg.requests)
    if not prompts.ids:
        raise DistillError(
            f"the test split has fewer than serve.bench.prompt_tokens={cfg.prompt_tokens} tokens"
        )
    return prompts.ids


# --------------------------------------------------------------------------- the client


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


async def _request(session, url: str, body: dict, key: str | None) -> dict:
    """One streamed completion: arrival time of every chunk that brought tokens, and the token count."""
    start = time.perf_counter()
    times: list[float] = []
    tokens = 0
    try:
        async with session.post(f"{url}/v1/completions", json=body, headers=_headers(key)) as resp:
            if resp.status != 200:
                return {"error": f"HTTP {resp.status}: {(await resp.text())[:200]}"}
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or {}
                count = usage.get("completion_tokens", tokens)
                if count > tokens:
                    times.append(time.perf_counter())
                    tokens = count
    except Exception as exc:  # noqa: BLE001 (every failure of a request is counted, the run goes on)
        return {"error": f"{type(exc).__name__}: {exc}"}
    if tokens == 0:
        return {"error": "no tokens streamed"}
    end = times[-1]
    return {
        "tokens": tokens,
        "ttft": times[0] - start,
        "gaps": [b - a for a, b in zip(times, times[1:], strict=False)],
        "tpot": (end - times[0]) / (tokens - 1) if tokens > 1 else None,
        "latency": end - start,
    }


async def _level(url: str, served: str, prompts: list[list[int]], concurrency: int, requests: int,
                 max_tokens: int, temperature: float, key: str | None) -> tuple[list[dict], float]:  # fmt: skip
    import aiohttp

    gate = asyncio.Semaphore(concurrency)

    async def one(session, i: int) -> dict:
        body = {
            "model": served,
            "prompt": prompts[i % len(prompts)],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": i,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        async with gate:
            return await _request(session, url, body, key)

    timeout = aiohttp.ClientTimeout(total=1800)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(session, i) for i in range(requests)))
        return results, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    values = sorted(values)
    pos = (len(values) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def summarise(results: list[dict], seconds: float) -> dict:
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    tokens = sum(r["tokens"] for r in ok)
    ttft = [r["ttft"] for r in ok]
    gaps = [g for r in ok for g in r["gaps"]]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]

    def ms(value):
        return None if value is None else round(1000 * value, 3)

    return {
        "requests": len(results),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "seconds": round(seconds, 3),
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / seconds if seconds > 0 else None,
        "requests_per_s": len(ok) / seconds if seconds > 0 else None,
        "ttft_ms_p50": ms(percentile(ttft, 50)),
        "ttft_ms_p95": ms(percentile(ttft, 95)),
        "itl_ms_p50": ms(percentile(gaps, 50)),
        "itl_ms_p95": ms(percentile(gaps, 95)),
        "tpot_ms_mean": ms(sum(tpot) / len(tpot)) if tpot else None,
    }


def drive(url: str, served: str, prompts: list[list[int]], recipe: RecipeConfig, key: str | None,
          label: str, log=print) -> dict:  # fmt: skip
    """Every concurrency level against one running server; acceptance per level and in all."""
    from distill.teacher_server import _healthy

    cfg = recipe.serve.bench
    asyncio.run(_level(url, served, prompts, 1, 1, cfg.max_tokens, cfg.temperature, key))  # warm-up
    first = before = spec_counters(url, key)
    levels = {}
    for concurrency in cfg.concurrency:
        results, seconds = asyncio.run(
            _level(url, served, prompts, concurrency, cfg.requests, cfg.max_tokens, cfg.temperature, key)
        )
        after = spec_counters(url, key)
        levels[str(concurrency)] = {**summarise(results, seconds), **acceptance(before, after)}
        before = after
        row = levels[str(concurrency)]
        rate = row["acceptance_rate"]
        log(
            f"bench: {label} c={concurrency}: {row['output_tokens_per_s']:.1f} tok/s, "
            f"TTFT p50 {row['ttft_ms_p50']} ms, ITL p50 {row['itl_ms_p50']} ms"
            + (f", acceptance {rate:.3f}" if rate is not None else "")
            + (f", {row['errors']} errors" if row["errors"] else "")
        )
    return {"levels": levels, **acceptance(first, before), "healthy_after": _healthy(url)}


def served_name(url: str, key: str | None) -> str:
    from distill.serve import served_models

    return served_models(url, key)[0]


# --------------------------------------------------------------------------- the stage


def bench_serve(recipe: RecipeConfig, url: str | None = None, log=print) -> dict:
    """Bench every chosen setup (or the server at `url`), write <run>/serve/bench.json, and add the
    distilled draft's acceptance to the gate. Returns bench.json's content."""
    from distill.gate import apply_acceptance
    from distill.models import model_fingerprint
    from distill.serve import serve_engine_args
    from distill.teacher_server import TeacherServer

    started = time.perf_counter()
    key = os.environ.get(recipe.serve.api_key_env)
    prompts = held_out_prompts(recipe)
    out = recipe.run_dir / "serve"
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    if url is not None:
        url = url.rstrip("/").removesuffix("/v1")
        name = served_name(url, key)
        log(f"bench: the running server at {url} ({name})")
        results["server"] = {"url": url, **drive(url, name, prompts, recipe, key, "server", log)}
    else:
        env = dict(os.environ)
        if key:
            env["VLLM_API_KEY"] = key
        for setup in chosen_setups(recipe):
            args = serve_engine_args(recipe, setup.mode, setup.model)
            served = "student" if setup.mode == "student" else "teacher"
            log(f"bench: {setup.name}: starting vllm serve ({args['model']}"
                + (f", draft {setup.model}" if setup.mode == "draft" else "") + ")")  # fmt: skip
            log_path = out / "logs" / f"{setup.name}.log"
            with TeacherServer(args, log_path, served_name=served, env=env) as server:
                row = drive(server.url, served, prompts, recipe, key, setup.name, log)
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
    bench = {
        "setups": results,
        "settings": {
            **cfg.model_dump(),
            "num_speculative_tokens": recipe.serve.num_speculative_tokens,
            "prompts": len(prompts),
        },
        "seconds": round(time.perf_counter() - started, 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(out / "bench.json", bench)
    gate_path = recipe.run_dir / "eval" / "gate.json"
    if url is None and gate_path.exists() and read_json(gate_path).get("status") != "evaluating":
        decision = apply_acceptance(read_json(gate_path), recipe.eval.gate, bench)
        atomic_write_json(gate_path, decision)
    return bench


def in_order(setups: dict) -> list[tuple[str, dict]]:
    """bench.json's setups (stored with sorted keys) in the order of the table: teacher, its drafts,
    the student, the quantized students."""
    rank = {"teacher": 0, DISTILLED_DRAFT: 1, "teacher+baseline": 2, "student": 3}
    return sorted(setups.items(), key=lambda kv: (rank.get(kv[0], 4), kv[0]))


def fresh_bench(recipe: RecipeConfig) -> dict | None:
    """<run>/serve/bench.json if its distilled draft is the run's current student, else None."""
    from distill.models import model_fingerprint

    path = recipe.run_dir / "serve" / "bench.json"
    student = recipe.run_dir / "student" / "final"
    if not path.exists() or not (student / "config.json").exists():
        return None
    bench = read_json(path)
    measured = bench["setups"].get(DISTILLED_DRAFT, {}).get("fingerprint", {}).get("weights_hash")
    return bench if measured == model_fingerprint(student, recipe.cache_path)["weights_hash"] else None


def comparison(bench: dict) -> list[str]:
    """The lines `distill bench serve` ends with: speed-up of each setup over the teacher alone, per level."""
    setups = bench["setups"]
    lines = []
    base = setups.get("teacher")
    for name, row in in_order(setups):
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

"""What each generated block of README.md and docs/ says: one function per block, from bench/results/.

bench/figures.py finds the blocks (`<!-- generated: NAME -->` ... `<!-- end generated -->`) and calls
BLOCKS[NAME](page) for each; the functions here return the block's lines. Every figure comes from a
result file, and so do the comparisons a new result could turn ("beats", "slower", "meets the goal");
the rest of the prose was written for the results as they are, so reread a block that `make figures`
changed. Links to docs pages go through `page.doc()`, relative to the README or to a docs page.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEMO_VARIANT = "bucket_ce"  # the kd_vs_sft variant recipes/tiny.yaml trains (forward KL, bucket, 0.5 CE)
SETUP_LABELS = {
    "teacher": "teacher",
    "teacher+student": "teacher + distilled (KD) draft",
    "teacher+baseline": "teacher + undistilled (SFT) draft",
    "student": "student (fp32)",
}


@dataclass
class Page:
    """Where a block is written: links to docs pages are relative to it."""

    path: Path

    def doc(self, target: str) -> str:
        """A link to docs/<target> (an .md page, optionally with #anchor) from this page."""
        return target if self.path.parent.name == "docs" else f"docs/{target}"

    @property
    def readme(self) -> bool:
        return self.path.name == "README.md"


def result(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


# --------------------------------------------------------------------------- number formats


def num(v: float, digits: int = 0) -> str:
    return f"{v:,.{digits}f}"


def times(v: float, digits: int = 2) -> str:
    return f"{v:.{digits}f}x"


def seconds(v: float) -> str:
    return f"{v:.2f} s" if v < 1 else f"{v:.1f} s"


def minutes(v: float) -> str:
    return f"{int(v // 60)} min {round(v % 60)} s"


def params(n: float) -> str:
    return f"{n / 1e6:.1f} M" if n < 2e7 else f"{n / 1e6:.0f} M"


def sci(v: float) -> str:
    mantissa, exponent = f"{v:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def pct(v: float) -> str:
    return f"{100 * v:.0f}%"


def bold(text: str, on: bool) -> str:
    return f"**{text}**" if on else text


# --------------------------------------------------------------------------- the demo's summary


def demo_table(name: str = "demo") -> dict[str, dict[str, str]]:
    """The summary's markdown table of a recorded run: model label -> column header -> cell."""
    rows = [line for line in result(name)["summary"] if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    return {
        cells[0]: dict(zip(header, cells, strict=True))
        for cells in ([c.strip() for c in row.strip("|").split("|")] for row in rows[2:])
    }


def cell(table: dict, model: str, column: str) -> float:
    return float(table[model][column].split()[0].replace(",", ""))


def block_demo(page: Page) -> list[str]:
    demo = result("demo")
    t = demo["timings"]
    table = demo_table()
    teacher, student = cell(table, "teacher", "parameters"), cell(table, "KD student", "parameters")
    run_line = demo["summary"][0]
    run_seconds = float(re.search(r"; (\d+)s\)$", run_line).group(1))
    pipeline = page.doc("pipeline.md#each-stage-on-its-own")
    return [
        f"`make demo` is `distill run {demo['recipe']}`: every stage of the pipeline ([the stages]({pipeline})) "
        f"on the embedded corpus. It pretrains the {teacher:.1f} M-parameter teacher (or reuses it from the "
        "cache), has it generate the teacher store with vLLM, trains the "
        f"{student:.1f} M-parameter KD student and the SFT baseline on the same sequences, quantizes the KD "
        "student to W8A8 with llm-compressor, evaluates all four with lm-eval (vLLM backend) and gates the "
        "students, benchmarks serving with vLLM (the teacher alone, with the KD draft, with the SFT draft, the "
        "students alone), writes the report and promotes the student. Measured on the 2-core CI machine "
        "(fp32; `bench/results/demo.json`, whose `source` names the run):",
        "",
        "| | |",
        "|---|---|",
        f"| `make demo` on a fresh clone with an empty cache, setup included | {minutes(t['fresh_clone_seconds'])} "
        f"(`distill run` {num(run_seconds)} s, teacher pretraining about "
        f"{round(t['teacher_pretrain_seconds'] / 60)} min included; {t['fresh_clone_note']}) |",
        f"| `make demo` again (every stage unchanged) | {num(t['rerun_unchanged_seconds'])} s |",
        "| after changing the gate (eval, bench, report and promote rerun; per-model lm-eval results reused) | "
        f"{num(t['gate_change_seconds'])} s ({t['gate_change_note']}) |",
        "",
        "It ends with this summary (the table from its second line on). `expected acceptance` is the eval "
        "stage's offline prediction, for the KD student and the SFT baseline, of the acceptance rate as the "
        "teacher's speculative-decoding draft, computed with transformers from the teacher's own continuations "
        f"of the serving benchmark's prompts ([how]({page.doc('evaluation.md#expected-acceptance-as-the-teachers-draft')})); "
        "`measured acceptance` is the rate `distill bench serve` measured from vLLM's counters:",
        "",
        "```",
        *[line for line in demo["summary"] if line.strip()],
        "```",
    ]


def block_demo_reading(page: Page) -> list[str]:
    demo, table = result("demo"), demo_table()
    kd, sft = "KD student", "SFT baseline"

    def pair(column: str, digits: int = 3) -> str:
        return f"{cell(table, kd, column):.{digits}f} vs {cell(table, sft, column):.{digits}f}"

    def better(column: str, lower: bool) -> bool:
        a, b = cell(table, kd, column), cell(table, sft, column)
        return a < b if lower else a > b

    ppl, out = "distill_ppl bits_per_byte", "distill_outside_ppl bits_per_byte"
    kl, cloze, nextword = "distill_match_outside kl", "distill_cloze acc", "distill_nextword exact_match"
    beats = better(ppl, True) and better(out, True) and better(kl, True)
    s = result("kd_vs_sft")["summary"]
    v, ref = s[DEMO_VARIANT], s["sft"]
    kl_gain = sorted(-v[f"{k}_kl_vs_sft"]["diff"] for k in ("test", "outside"))
    ratio = cell(table, kd, "measured acceptance") / cell(table, sft, "measured acceptance")
    kd_vs_sft = page.doc("kd-vs-sft.md")
    return [
        f"That run ({demo['run_of']}) trains with forward KL plus half the samples' CE (issue #13), and the KD "
        f"student {'beats' if beats else 'does not beat'} the SFT baseline on the corpus's and on outside bits "
        f"per byte ({pair(ppl)}, {pair(out)}) and on full-vocabulary KL ({pair(kl, 2)} outside). Measured over "
        f"three seeds against SFT, paired, that objective wins on test bits per byte by "
        f"{-v['test_bits_per_byte_vs_sft']['diff']:.3f} and outside by "
        f"{-v['outside_bits_per_byte_vs_sft']['diff']:.3f}, on full-vocabulary KL by "
        f"{kl_gain[0]:.2f}-{kl_gain[1]:.2f}, at an acceptance of {v['measured_acceptance']:.2f} against SFT's "
        f"{ref['measured_acceptance']:.2f} ([KD against SFT]({kd_vs_sft}), generated by `bench/kd_vs_sft.py`).",
        "",
        "In that run, the KD student and the SFT baseline have the same size, steps and sequences; "
        f"distillation buys the cloze and next-word scores ({pair(cloze)}, {pair(nextword)}) and a draft the "
        f"teacher accepts {ratio:.1f} times as often ({pair('measured acceptance')}), which the eval stage "
        f"predicted before any server started ({pair('expected acceptance')}). Tokens/s here are vLLM's own "
        "serving benchmark (output throughput) on a 32-request, two-level load on a 2-core machine, and are "
        f"noisy; [the serving benchmark]({page.doc('serving.md#the-serving-benchmark')}) has the longer "
        "measurement. The gate of `recipes/tiny.yaml` asks for 80% of the teacher's bits per byte (the student "
        f"has {pct(cell(table, kd, 'parameters') / cell(table, 'teacher', 'parameters'))} of its parameters "
        "and 200 steps), at most 0.05 less cloze accuracy, 80% of its next-word exact match, a W8A8 student "
        "within 1% of the unquantized one, and an acceptance rate of at least 0.3. `make demo` exits non-zero "
        "when the gate fails (exit status 3 from `distill run`).",
    ]


def block_wall_times(page: Page) -> list[str]:
    demo, tests = result("demo"), result("tests")
    return [
        f"Measured on the 2-core CI machine from a fresh clone: `make demo` "
        f"{minutes(demo['timings']['fresh_clone_seconds'])}, `make test` {minutes(tests['total_seconds'])} "
        f"({tests['passed']} tests) ([tests]({page.doc('tests.md')}))."
    ]


def block_tests(page: Page) -> list[str]:
    t = result("tests")
    outcome = f"{t['passed']} passed" + "".join(f", {t[k]} {k}" for k in ("failed", "skipped") if t.get(k))
    return [
        f"`make test` runs `ruff check`, builds these docs (`mkdocs build --strict`) and then `pytest` over "
        f"everything ({outcome}; on a fresh clone of main at {t['commit']} on the 2-core machine: "
        f"{minutes(t['pytest_seconds'])} of pytest, {minutes(t['total_seconds'])} in all with setup, measured; "
        f"{t['note']}; `bench/results/tests.json`)."
    ]


def block_threads(page: Page) -> list[str]:
    t = result("threads")
    parts = []
    for width, row in t["threads"].items():
        two, single = row["2 at once, default threads"]["seconds"], row["2 at once, 1 thread each"]["seconds"]
        parts.append(
            f"width {width}: {seconds(two)} against {seconds(single)}, "
            f"{times(row['ratio_two_default_over_two_single'], 1)}"
        )
    e = t["engine_start"]
    default = e["vLLM default (spawned engine core and worker)"]["median"]
    inproc = e["in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0)"]["median"]
    return [
        f"Measured by `bench/threads.py` on the 2-core machine: two processes training a small Llama side by "
        f"side ({t['steps']} steps each) took this long with OpenMP's default thread count against one thread "
        f"each: {'; '.join(parts)}. A `vllm.LLM` on a micro model, from importing vLLM to its first answer, "
        f"took {seconds(default)} with vLLM's spawned engine processes and {seconds(inproc)} in-process "
        f"({times(e['ratio_default_over_in_process'], 1)}; medians of {len(e[next(iter(e))]['seconds'])}; "
        f"`bench/results/threads.json`)."
    ]


# --------------------------------------------------------------------------- the headline table


def block_figures(page: Page) -> list[str]:
    cap, loss, step = result("teacher_capture"), result("kd_loss"), result("train_step")
    pol, vs_off, procs = result("onpolicy"), result("onpolicy_vs_offline"), result("train_processes")
    serve = result("serve_bench")
    llama = cap["size"]["llama3_vocab_128256"]
    gains = onpolicy_gains(vs_off)
    sampling = pol["student_sampling"]
    setups, exp, t1 = serve["setups"], serve["expected_acceptance"], serve["temperature_1"]
    kd, sft = setups["teacher+student"], setups["teacher+baseline"]
    w8, fp = setups["student-w8a8"], setups["student"]
    levels = serve["settings"]["concurrency"]
    bench_cmd = f"`{serve['command']}`"
    d = page.doc
    rows = [
        ("teacher store size, k=32, Llama 3's vocabulary",
         f"{llama['store_bytes_per_token']:.1f} bytes/token: {times(llama['ratio_vs_zstd'])} smaller than int32 "
         f"ids + fp16 logprobs in zstd Parquet, {times(llama['ratio_vs_raw'], 1)} smaller than raw",
         "`.venv/bin/python bench/teacher_capture.py`", f"[the store]({d('teacher.md#the-store')})"),
        ("teacher capture, vLLM / transformers",
         f"scoring {cap['speed']['score_ratio_vllm_over_hf']:.2f}, sampling "
         f"{cap['speed']['sample_ratio_vllm_over_hf']:.1f}",
         "`.venv/bin/python bench/teacher_capture.py`", f"[the teacher stage]({d('teacher.md#measured')})"),
        (f"chunked sparse KD loss vs a plain dense loss (Llama 3 vocabulary, {loss['batch']} x {num(loss['seq'])})",
         f"{times(loss['loss_memory_ratio_plain_over_distill'], 1)} less peak memory, "
         f"{times(1 / loss['time_ratio_distill_over_plain'], 1)} faster",
         "`.venv/bin/python bench/kd_loss.py`", f"[the losses]({d('training.md#measured')})"),
        ("`distill train` vs TRL's `GKDTrainer`",
         f"{times(step['tokens_per_s_ratio_distill_over_trl'], 1)} the training tokens/s, "
         f"{times(step['peak_rss_ratio_trl_over_distill'], 1)} less peak memory; "
         f"{times(step['end_to_end_ratio_distill_over_trl'])} end to end counting `distill generate`",
         "`make bench-env`, then `.venv/bin/python bench/train_step.py`", f"[against TRL]({d('training.md#against-trl')})"),
        ("KD vs SFT student on held-out and outside text, 3 seeds, paired",
         f"see [KD against SFT]({d('kd-vs-sft.md')}) (generated)", "`.venv/bin/python bench/kd_vs_sft.py`",
         f"[KD against SFT]({d('training.md#kd-against-sft')})"),
        (f"on-policy vs offline KD, held-out expected acceptance (training's `val_acceptance`) gained in "
         f"{vs_off['steps']} more steps",
         f"{gains['on_policy']:+.3f} vs {gains['offline']:+.3f} (about "
         f"{times(gains['on_policy'] / gains['offline'], 1)})",
         "`.venv/bin/python bench/onpolicy_vs_offline.py`", f"[on-policy]({d('on-policy.md#on-policy-makes-the-better-draft')})"),
        ("student sampler, vLLM / transformers tokens/s",
         ", ".join(f"{r['ratio_vllm_over_transformers']:.2f} ({params(r['parameters'])}{' parameters' * (i == 0)})"
                   for i, r in enumerate(sampling.values())),
         "`.venv/bin/python bench/onpolicy.py`", f"[the sampler]({d('on-policy.md#the-students-sampler')})"),
        ("teacher scoring, vLLM server / transformers forward",
         times(pol["teacher_scoring"]["ratio_vllm_over_transformers"], 1),
         "`.venv/bin/python bench/onpolicy.py`", f"[where a round's time goes]({d('on-policy.md#where-a-rounds-time-goes')})"),
        ("serving: distilled vs SFT draft of the same size",
         f"acceptance {kd['acceptance_rate']:.3f} vs {sft['acceptance_rate']:.3f} "
         f"({kd['acceptance_rate'] / sft['acceptance_rate']:.0f}x), mean acceptance length "
         f"{kd['mean_acceptance_length']:.2f} vs {sft['mean_acceptance_length']:.2f}; the teacher with it at "
         f"{times(vs_teacher(setups, 'teacher+student', levels[0]))} its own speed at concurrency {levels[0]}, "
         f"{times(vs_teacher(setups, 'teacher+baseline', levels[0]))} with the SFT draft",
         bench_cmd, f"[the serving benchmark]({d('serving.md#the-serving-benchmark')})"),
        ("W8A8 vs fp32 student served by vLLM",
         f"{' / '.join(times(speed(w8, c) / speed(fp, c)) for c in levels)} the throughput at concurrency "
         f"{' / '.join(map(str, levels))}, {times(w8['mib'] / fp['mib'])} the size",
         bench_cmd, f"[the serving benchmark]({d('serving.md#the-serving-benchmark')})"),
        (f"expected (offline, eval stage) vs measured (vLLM) acceptance, greedy, k = "
         f"{serve['settings']['num_speculative_tokens']}",
         f"KD draft {exp['student']['acceptance_rate']:.3f} vs {kd['acceptance_rate']:.3f}, SFT draft "
         f"{exp['sft']['acceptance_rate']:.3f} vs {sft['acceptance_rate']:.3f}; at temperature 1, "
         f"{t1['expected']['acceptance_rate']:.3f} vs {t1['measured']['acceptance_rate']:.3f}",
         "`distill eval`, then `distill bench serve`",
         f"[expected acceptance]({d('evaluation.md#expected-acceptance-as-the-teachers-draft')})"),
        ("the demo's training, DDP over 2 processes / 1 process (same global batch)",
         f"{times(procs['wall_ratio_2_over_1'])} the wall time, {times(procs['loop_speed_ratio_2_over_1'])} the "
         "loop's tokens/s",
         "`.venv/bin/python bench/train_processes.py runs/tiny`", f"[distributed training]({d('scaling-out.md#the-demo-stays-on-one-process')})"),
    ]  # fmt: skip
    return [
        "| what | measured | produced by | details |",
        "|---|---|---|---|",
        *[f"| {' | '.join(row)} |" for row in rows],
    ]


# --------------------------------------------------------------------------- teacher stage


def block_teacher_capture(page: Page) -> list[str]:
    cap = result("teacher_capture")
    sp = cap["speed"]
    score = sp["score_ratio_vllm_over_hf"]
    return [
        "Measured with `.venv/bin/python bench/teacher_capture.py` (results in "
        f"`bench/results/teacher_capture.json`; 2-core CPU machine, fp32, k={cap['k']}, one run):",
        "",
        "| | vLLM (CPU build) | transformers | ratio vLLM / HF |",
        "|---|---|---|---|",
        f"| score: {cap['sequences']} blocks x {cap['seq_len']} tokens, {params(cap['model_parameters'])}-parameter "
        f"Llama | {num(sp['vllm_score_tokens_per_s'])} tokens/s | {num(sp['hf_score_tokens_per_s'])} tokens/s | "
        f"{score:.2f} |",
        f"| sample: 32 prompts x 64 new tokens, same model | {num(sp['vllm_sample_tokens_per_s'])} tokens/s | "
        f"{num(sp['hf_sample_tokens_per_s'])} tokens/s | {sp['sample_ratio_vllm_over_hf']:.1f} |",
        f"| engine start | {sp['vllm_engine_start_s']:.0f} s | (none) | |",
        "",
        f"On this CPU, scoring is {'as fast or faster' if score <= 1 else 'a little slower'} with transformers "
        f"(one batched forward pass; vLLM's CPU build runs prompt_logprobs at {times(score)} its speed), while "
        f"sampling is about {sp['sample_ratio_vllm_over_hf']:.1f}x faster with vLLM. The HF backend decodes a "
        "batch of prompts with a KV cache, each prompt drawing from its own generator seeded as vLLM seeds the "
        "request, so a prompt's samples do not depend on the batch or the shard it falls in; it then scores "
        "the sequences in a second pass, while vLLM returns the logprobs as it decodes. On GPUs, with "
        "continuous batching and paged attention, vLLM is the one to use for both, and `teacher.backend: "
        "auto` picks it there.",
    ]


def block_backend_auto(page: Page) -> list[str]:
    from distill.stages.generate import VLLM_CPU_START_S, cpu_score_seconds

    small, real = result("teacher_capture"), result("real_teacher")

    def crossing(parameters: int) -> str:
        hf, vllm = (x - VLLM_CPU_START_S * (i == 1) for i, x in enumerate(cpu_score_seconds(parameters, 1)))
        if vllm >= hf:
            return "transformers is chosen at any size"
        return f"vLLM is chosen above {num(VLLM_CPU_START_S / (hf - vllm))} tokens"

    return [
        "For scoring on CPUs, `auto` estimates both engines' time for the job and takes the shorter: the "
        "seconds per token of each, linear in the teacher's parameters (read from its safetensors headers) "
        f"through two measured teachers, plus {VLLM_CPU_START_S:.0f} s for vLLM's start. The two points: "
        f"{params(small['model_parameters'])} parameters (`bench/results/teacher_capture.json`), where vLLM "
        f"scores {small['speed']['score_ratio_vllm_over_hf']:.2f}x transformers' tokens/s, so "
        f"{crossing(small['model_parameters'])}; and SmolLM2-135M (`bench/results/real_teacher.json`), "
        f"{real['speed']['score_ratio_vllm_over_hf']:.2f}x, so {crossing(real['parameters'])}.",
    ]


def block_store_size(page: Page) -> list[str]:
    cap = result("teacher_capture")
    size = cap["size"]
    rows = [("tiny_vocab_4096", "4,096 (ours, 12-bit ids)", False), ("llama3_vocab_128256", "128,256 (Llama 3, 17-bit ids)", True)]  # fmt: skip
    llama = size["llama3_vocab_128256"]
    ids_bytes = 17 * cap["k"] / 8  # ceil(log2 128,256) bits per id, k ids per position
    lines = [
        f"Store size at k={cap['k']}, on {num(size['positions'])} positions the pretrained embedded teacher "
        "scored (zstd Parquet, input ids and the next token's logprob included):",
        "",
        "| vocabulary | our store | int32 ids + fp16 logprobs, zstd | the same, raw | vs zstd | vs raw |",
        "|---|---|---|---|---|---|",
    ]
    for key, label, strong in rows:
        r = size[key]
        ours = f"{r['store_bytes_per_token']:.1f} bytes/token"
        lines.append(
            f"| {label} | {bold(ours, strong)} | "
            f"{r['int32_fp16_zstd_bytes_per_token']:.1f} | {r['int32_fp16_raw_bytes_per_token']:.0f} | "
            f"{times(r['ratio_vs_zstd'])} smaller | {times(r['ratio_vs_raw'], 1)} smaller |"
        )
    goal = llama["store_bytes_per_token"] <= 100
    lines += [
        "",
        "The Llama 3 row writes the same captures with ids mapped one-to-one into Llama 3's range (no Llama 3 "
        "model runs here), so ids cost their full 17 bits; the logprobs are a real language model's. It "
        f"{'meets' if goal else 'misses'} the goal of at most 100 bytes per token with the error bound above. "
        f"The ids are the bulk ({ids_bytes:.0f} of the {llama['store_bytes_per_token']:.0f} bytes): the "
        "delta-coded logprobs compress to about 1-2 bits each.",
    ]
    return lines


# --------------------------------------------------------------------------- training


def kd_loss_lines(name: str, vocabulary: str) -> list[str]:
    r = result(name)
    plain, ours = r["plain"], r["distill"]
    return [
        f"Measured with `.venv/bin/python bench/kd_loss.py --vocab {r['vocab']}` (`bench/results/{name}.json`): "
        f"forward KL at {vocabulary}, B x T = {r['batch']} x {num(r['seq'])}, forward + backward, fp32 on this "
        "2-core CPU, each in its own process:",
        "",
        "| | peak memory over its inputs | time |",
        "|---|---|---|",
        f"| plain dense loss (teacher's full logits) | {plain['loss_peak_mb'] / 1000:.1f} GB | "
        f"{plain['seconds']:.1f} s |",
        f"| distill's chunked sparse loss (stored top-{r['k']}) | {ours['loss_peak_mb'] / 1000:.1f} GB "
        f"({ours['logits_mb'] / 1000:.1f} GB of it is the logits' gradient) | {ours['seconds']:.1f} s |",
        f"| ratio | **{times(r['loss_memory_ratio_plain_over_distill'], 1)} less** | "
        f"**{times(1 / r['time_ratio_distill_over_plain'], 1)} faster** |",
        "",
        "Counting inputs too (the plain loss also needs the teacher's dense logits), peak memory is "
        f"{times(r['total_memory_ratio_plain_over_distill'], 1)} lower.",
    ]


def block_kd_loss(page: Page) -> list[str]:
    return kd_loss_lines("kd_loss", "Llama 3's vocabulary (128,256)")


def block_kd_loss_smollm2(page: Page) -> list[str]:
    return kd_loss_lines("kd_loss_smollm2", "SmolLM2's vocabulary (49,152)")


def block_fused_loss(page: Page) -> list[str]:
    r = result("fused_loss")
    rows, caps, goal = [], [], []
    for n, size in r["sizes"].items():
        for vocab, v in size["vocabs"].items():
            plain, chunked, fused, ratio = v["plain"], v["chunked"], v["fused"], v["ratios"]
            rows.append(
                f"| {size['batch']} x {num(r['seq'])} | {num(int(vocab))} "
                f"| {plain['loss_peak_mb'] / 1000:.2f} GB, {plain['seconds']:.1f} s "
                f"| {chunked['loss_peak_mb'] / 1000:.2f} GB, {chunked['seconds']:.1f} s "
                f"| {fused['loss_peak_mb'] / 1000:.2f} GB, {fused['seconds']:.1f} s "
                f"| **{times(ratio['memory_plain_over_fused'], 1)} less** | {times(ratio['time_fused_over_plain'])} |"
            )
        v = size["vocabs"].get("128256")
        if v is None:
            continue
        grads = v["fused"]["weight_grad_mb"] + v["fused"]["hidden_grad_mb"]
        caps.append(f"{times(v['plain']['loss_peak_mb'] / grads, 1)} at B x T = {num(int(n))}")
        memory, time = v["ratios"]["memory_plain_over_fused"], v["ratios"]["time_fused_over_plain"]
        met = memory >= 10 and time <= 1
        goal.append(
            f"B x T = {num(int(n))}: {times(memory, 1)} less memory in {times(time)} the time, "
            f"{'met' if met else 'not met'}"
        )
    first = next(iter(r["sizes"].values()))["vocabs"]
    big = first.get("128256") or next(iter(first.values()))
    working = big["fused"]["loss_peak_mb"] - big["fused"]["weight_grad_mb"] - big["fused"]["hidden_grad_mb"]
    return [
        f"Measured with `.venv/bin/python bench/fused_loss.py` (`bench/results/fused_loss.json`): from the "
        f"last hidden states (H = {num(r['hidden'])}) through the output layer to the gradients of both, "
        "forward + backward, fp32 on this 2-core CPU, each variant in its own process; peak memory over the "
        f"inputs, the gradients included. The fused loss ran with its defaults ({num(r['chunk_elements'])} logits "
        f"a chunk, {r['chunk_tokens']} rows a loss block):",
        "",
        "| B x T | V | plain dense loss (teacher's full logits) | unfused (`fused_loss: off`, stored "
        f"top-{r['k']}) | fused (`auto`) | memory, plain / fused | time, fused / plain |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Every loss holds the gradients of the output layer (V x H, {big['fused']['weight_grad_mb'] / 1000:.2f} GB "
        "at V = 128,256) and of the hidden states, so no loss can be lighter than the plain one by more than "
        f"{', '.join(caps)}. The plain loss grows with B x T and the fused one does not: beside the gradients "
        f"it works in {working / 1000:.2f} GB at the first size. Issue 19's goal (at least 10x less memory than "
        f"the plain loss at V = 128,256 and B x T >= 4,096, in no more time): {'; '.join(goal)}.",
    ]


BUILDS = {"avx512_bf16": "AVX-512 BF16", "avx512": "AVX-512", "avx2": "AVX2"}  # vLLM's x86 CPU builds


def block_quant_serving(page: Page) -> list[str]:
    """One section per vLLM CPU kernel build measured (bench/results/quant_serving_<build>.json)."""
    from distill.vllm.kernels import CPU_LIBRARIES

    lines = []
    for build, label in BUILDS.items():
        path = RESULTS / f"quant_serving_{build}.json"
        if path.exists():
            heading = f"**vLLM's {label} build (`{CPU_LIBRARIES[build]}`):**"
            lines += ["", heading, "", *quant_serving_section(result(path.stem))]
    return lines[1:]


def quant_serving_section(r: dict) -> list[str]:
    rounds = r["rounds"]
    # the W8A8 forms benched: the default (output layer in fp32) and, with --lm-head, the output layer in int8
    forms = [("student-w8a8", "W8A8", "w8a8_over_fp32")]
    if "w8a8_lm_head_over_fp32" in r:
        forms.append(("student-w8a8-lm_head", "W8A8 + int8 output layer", "w8a8_lm_head_over_fp32"))
    levels = list(r["w8a8_over_fp32"])
    best = {
        s: {c: max(x[s][c]["output_tokens_per_s"] for x in rounds) for c in levels}
        for s, *_ in [("student",), *forms]
    }

    def ratio_cells(key: str, c: str) -> str:
        x = r[key][c]
        return f"{', '.join(times(v) for v in x['per_round'])} | {bold(times(x['mean']), x['mean'] >= 1.3)}"

    head_note = (
        ", and that form with the output layer quantized too (`quantize.lm_head: [w8a8]`)"
        if len(forms) > 1
        else ""
    )
    lines = [
        f"Measured with `.venv/bin/python bench/quant_serving.py{' --lm-head' if len(forms) > 1 else ''}` "
        f"(`bench/results/quant_serving_{r['vllm_cpu_build']}.json`): "
        f"{r['student']} (`{r['run']}`, SmolLM2-135M-Instruct cut to 12 layers) and its `w8a8` form{head_note}, each served "
        f"alone by vLLM's CPU server on {r['machine']}; {r['requests']} requests of {r['prompt_tokens']} prompt "
        f"and {r['max_tokens']} output tokens per level, greedy; {len(rounds)} rounds:",
        "",
        "| concurrency | fp32, tokens/s | "
        + " | ".join(f"{label}, tokens/s | {label} / fp32, per round | mean" for _, label, _ in forms)
        + " |",
        "|---|---|" + "---|---|---|" * len(forms),
        *[
            f"| {c} | {num(best['student'][c])} | "
            + " | ".join(f"{num(best[s][c])} | {ratio_cells(key, c)}" for s, _, key in forms)
            + " |"
            for c in levels
        ],
    ]
    prof = r.get("profile")
    if not prof:
        return lines
    head = all("predicted_speedup_with_head" in x for x in prof.values())
    lines += [
        "",
        "Where a decode step goes (fp32 server's time per output token, split by timing the kernels vLLM's CPU "
        "build runs for each linear layer at that many tokens: fp32 `onednn_mm`, and W8A8's dynamic "
        "`onednn_scaled_int8_quant` + `onednn_scaled_mm`):",
        "",
        "| concurrency | step (TPOT) | 12 decoder layers' linears, fp32 -> W8A8 | output layer, fp32"
        + (" -> W8A8" if head else "")
        + " | the rest | W8A8 could give"
        + (" | with the output layer too |" if head else " |"),
        "|---|---|---|---|---|---|" + ("---|" if head else ""),
        *[
            f"| {c} | {x['fp32_tpot_us'] / 1000:.1f} ms | {x['fp32_layers_us'] / 1000:.1f} -> "
            f"{x['w8a8_layers_us'] / 1000:.1f} ms ({pct(x['layers_share'])} of the step) | "
            f"{x['lm_head_us'] / 1000:.1f}"
            + (f" -> {x['lm_head_w8a8_us'] / 1000:.1f}" if head else "")
            + f" ms ({pct(x['lm_head_share'])}) | {pct(x['rest_share'])} | {times(x['predicted_speedup'])} |"
            + (f" {times(x['predicted_speedup_with_head'])} |" if head else "")
            for c, x in prof.items()
        ],
        "",
    ]
    speedups = [x["kernel_speedup_layers"] for x in prof.values()]
    shares = [x["layers_share"] for x in prof.values()]
    if min(speedups) >= 1:
        lines.append(
            f"The int8 kernels run the decoder's linear layers {min(speedups):.1f}-{max(speedups):.1f}x faster, "
            f"but those are only {pct(min(shares))}-{pct(max(shares))} of a step. The output layer (vocabulary x "
            "width), which distill's W8A8 recipe leaves in fp32 by default (`ignore: [lm_head]`, as llm-compressor's "
            "examples do), and the rest (attention, norms, sampling, the engine's own work) do not change, so by "
            "Amdahl's law W8A8 can give about what the "
            + ("'W8A8 could give' column says" if head else "last column says")
            + ", and the measured ratios sit at or near it. "
            + (
                "Quantizing the output layer too (`quantize.lm_head: [w8a8]`) moves it onto the int8 kernel as "
                f"well: measured {times(min(x['mean'] for x in r['w8a8_lm_head_over_fp32'].values()))}-"
                f"{times(max(x['mean'] for x in r['w8a8_lm_head_over_fp32'].values()))} the fp32 student's "
                "tokens/s (means over rounds), against the "
                f"{times(min(x['predicted_speedup_with_head'] for x in prof.values()))}-"
                f"{times(max(x['predicted_speedup_with_head'] for x in prof.values()))} the profile predicts."
                if len(forms) > 1
                else "More would take quantizing the output layer too."
            )
        )
    else:
        slow = [1 / v for v in speedups]
        lines.append(
            f"Here the int8 kernels run the decoder's linear layers {min(slow):.1f}-{max(slow):.1f}x slower than "
            "the fp32 ones: vLLM's AVX2 build has no int8 path that beats its fp32 matrix product, so W8A8 serves "
            "slower than fp32 at every concurrency"
            + (" (quantizing the output layer too would make it slower still)" if head else "")
            + ". `distill quantize` and `distill serve --quant w8a8` say so on such machines; serve the fp32 "
            "student there."
        )
    return lines


def block_end_to_end(page: Page) -> list[str]:
    r = result("end_to_end")
    names = {"embedded": "embedded (tiny.yaml)", "smollm2": "SmolLM2-135M-Instruct -> 12-layer cut"}
    rows, gens = [], []
    for pair, x in r["pairs"].items():
        g = x["generate"]
        gens.append(
            f"{names[pair]}: vLLM {g['vllm']['command_seconds']:.0f} s, transformers {g['hf']['command_seconds']:.0f} s"
        )
        for e, d in x["distill"].items():
            q = x["quality"][e]

            def diff(source, q=q):
                c = q[source]["distill_minus_trl"]
                return f"{c['diff']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]"

            best = max(d["end_to_end_ratio_vllm"], d["end_to_end_ratio_hf"])
            rows.append(
                f"| {names[pair]} | {e} | {x['trl'][e]['command_seconds']:.0f} s | {d['end_to_end_seconds_vllm']:.0f} s "
                f"({times(d['end_to_end_ratio_vllm'])}) | {d['end_to_end_seconds_hf']:.0f} s "
                f"({times(d['end_to_end_ratio_hf'])}) | {bold(times(best), best >= 1.5)} | {diff('test')} | {diff('outside')} |"
            )
    return [
        "Measured with `make bench-env` once, then `.venv/bin/python bench/end_to_end.py` (`bench/results/end_to_end.json`): "
        "whole commands on both sides, fp32, 2 CPU cores, one run each. distill: `distill generate` (score mode, the "
        "teacher's top-k over the same corpus blocks) once, then `distill train`; TRL: `GKDTrainer` (lmbda 0, beta 0: "
        "forward KL on fixed sequences) with the teacher's forward at every step. Same initial student, blocks, "
        f"batch and schedule. Held-out bits per byte of the two final students on {r['documents']} corpus test and "
        f"{r['documents']} outside documents, distill minus TRL, with 95% bootstrap intervals (lower is better for "
        "distill):",
        "",
        "| teacher -> student | epochs | TRL GKD | distill, vLLM capture | distill, transformers capture | best ratio | "
        "bpb test, distill - TRL | bpb outside |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "The capture alone (`distill generate`, engine start and model loading included): "
        + "; ".join(gens)
        + ".",
    ]


# --------------------------------------------------------------------------- the real teacher


def block_real_teacher(page: Page) -> list[str]:
    r = result("real_teacher")
    sp, cpu, w = r["speed"], r["cpu"], r["work"]
    rows = []
    for mode, work in (("score", f"{w['blocks']} corpus blocks x {w['seq_len']} tokens"),
                       ("sample", f"{w['prompts']} chat prompts ({w['mean_prompt_tokens']:.0f} tokens) x up to "
                                  f"{w['max_new_tokens']} new tokens")):  # fmt: skip
        rows.append(
            f"| {mode}: {work} | {num(sp[f'vllm_{mode}_tokens_per_s'])} tokens/s ({pct(sp[f'vllm_{mode}_flop_utilization'])}) "
            f"| {num(sp[f'hf_{mode}_tokens_per_s'])} tokens/s ({pct(sp[f'hf_{mode}_flop_utilization'])}) "
            f"| {sp[f'{mode}_ratio_vllm_over_hf']:.2f} |"
        )
    size = r["size"]
    return [
        f"Measured with `.venv/bin/python bench/real_teacher.py` (`bench/results/real_teacher.json`): {r['teacher']}, "
        f"{params(r['parameters'])} parameters, top-{r['k']}, fp32 on this 2-core CPU, one run. In brackets, the "
        f"share of this CPU's FLOP limit it reaches: the best fp32 GEMM measured in the same run, "
        f"{cpu['gemm_fp32_gflops']:.0f} GFLOP/s on {cpu['threads']} threads, against "
        f"{cpu['forward_gflop_per_token']['score']:.2f} GFLOP per token of forward pass:",
        "",
        "| | vLLM (CPU build) | transformers | ratio vLLM / HF |",
        "|---|---|---|---|",
        *rows,
        f"| engine start | {sp['vllm_engine_start_s']:.0f} s | (none) | |",
        "",
        f"Store size at V = {num(r['vocab_size'])} ({r['id_bits']}-bit ids), the same captures:",
        "",
        "| captures | our store | int32 ids + fp16 logprobs, zstd | the same, raw | vs zstd |",
        "|---|---|---|---|---|",
        *[
            f"| {mode} ({num(size[mode]['positions'])} positions) | **{size[mode]['store_bytes_per_token']:.1f} "
            f"bytes/token** | {size[mode]['int32_fp16_zstd_bytes_per_token']:.1f} | "
            f"{size[mode]['int32_fp16_raw_bytes_per_token']:.0f} | {times(size[mode]['ratio_vs_zstd'])} smaller |"
            for mode in ("score", "sample")
        ],
    ]


def block_cut_layers(page: Page) -> list[str]:
    r = result("cut_layers")
    cuts, teacher = r["cuts"], r["cuts"]["teacher"]
    ranked = sorted((name for name in cuts if name != "teacher"),
                    key=lambda n: (len(cuts[n]["layers"]), cuts[n]["test"]["bits_per_byte"]))  # fmt: skip
    rows = [
        f"| {name} | {len(cuts[name]['layers'])} | {cuts[name]['test']['bits_per_byte']:.2f} | "
        f"{cuts[name]['outside']['bits_per_byte']:.2f} | {cuts[name]['test']['kl']:.2f} | "
        f"{cuts[name]['test']['top1_agreement']:.3f} |"
        for name in ranked
    ]
    return [
        f"Untrained cuts of the {r['teacher_layers']}-layer teacher, measured by `bench/cut_layers.py` "
        f"(`bench/results/cut_layers.json`) with the eval stage's own measures: bits per byte on "
        f"{r['documents']['test']} corpus test documents and {r['documents']['outside']} outside documents (up to "
        f"{r['tokens']} tokens each), full-vocabulary KL to the teacher (nats/token) and top-1 agreement on "
        f"the test documents. The teacher has {teacher['test']['bits_per_byte']:.2f} and "
        f"{teacher['outside']['bits_per_byte']:.2f} bits per byte. `importance N` keeps N layers chosen by "
        "`distill.pruning`: the contiguous block whose input and output hidden states are closest in angle, "
        f"on {r['calibration']['documents']} corpus train documents ({num(r['calibration']['tokens'])} tokens), "
        "is dropped, the first and last layers kept. `kl N` (`select: kl`) drops instead the block whose "
        "removal moves the teacher's next-token distribution least on those documents.",
        "",
        "| layers kept | count | test bits/byte | outside bits/byte | KL | top-1 |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def pipeline_stages(r: dict) -> list[str]:
    """The pipeline's stages as a recorded run's summary lists them, run or skipped (the manifest also
    times the verbs they ran inside: generate-validation and generate-heldout within generate,
    train-baseline as baseline)."""
    first = r["summary"][0]
    names = re.search(r"ran: ([^;]*);", first)[1].split(", ") + re.search(r"unchanged: ([^;]*);", first)[
        1
    ].split(", ")
    return [n for n in names if n != "nothing"]


def block_smollm2(page: Page, name: str = "smollm2") -> list[str]:
    r = result(name)
    stages = {stage: r["stage_seconds"].get(stage, 0) for stage in pipeline_stages(r)}
    slowest = sorted(stages.items(), key=lambda kv: -kv[1])
    rerun = r.get("rerun")
    return [
        *([r["note"], ""] if r.get("note") else []),
        f"`distill run {r['recipe']}` on the 2-core CPU machine, fp32, the GGUF already converted "
        f"(`bench/results/{name}.json`, whose `source` names the run): **{minutes(r['wall_seconds'])}** wall "
        "time"
        + (
            f", every stage run. {rerun['why']} ({minutes(rerun['wall_seconds'])}); the summary below is that "
            "run's"
            if rerun
            else ""
        )
        + (
            ". Per pipeline stage of the full run (its manifest's seconds):"
            if rerun
            else ". Per pipeline stage (the manifest's seconds):"
        ),
        "",
        "| " + " | ".join(name for name, _ in slowest) + " |",
        "|" + "---|" * len(slowest),
        "| " + " | ".join(f"{v / 60:.1f} min" for _, v in slowest) + " |",
        "",
        "It ends with this summary (`initial student` is the cut before training; `distill_match_instructions` "
        "is measured on the teacher's answers to the 32 held-out prompts):",
        "",
        "```",
        *[line for line in r["summary"] if line.strip()],
        "```",
    ]


def block_smollm2_reading(page: Page) -> list[str]:
    r, table = result("smollm2"), demo_table("smollm2")
    kd, sft, first, w8 = "KD student", "SFT baseline", "initial student", "student-w8a8"
    ppl, out = "distill_ppl bits_per_byte", "distill_outside_ppl bits_per_byte"
    top1, kl = "distill_match_instructions top1_agreement", "distill_match_test kl"

    def of(model: str, column: str, digits: int = 3) -> str:
        return f"{cell(table, model, column):.{digits}f}"

    def pair(column: str, digits: int = 3) -> str:
        return f"{of(kd, column, digits)} vs {of(sft, column, digits)}"

    ahead = sum(
        (cell(table, kd, c) < cell(table, sft, c)) if lower else (cell(table, kd, c) > cell(table, sft, c))
        for c, lower in ((ppl, True), (out, True), (top1, False), (kl, True))
    )
    serve = r["serve"]
    level = max(serve["teacher"]["output_tokens_per_s"], key=int)
    alone = serve["teacher"]["output_tokens_per_s"][level]
    drafted = serve["teacher+student"]["output_tokens_per_s"][level] / alone
    cost = cell(table, kd, "parameters") / cell(table, "teacher", "parameters")
    pays = (
        ""
        if drafted >= 1
        else (
            f": at this acceptance a draft with {pct(cost)} of the teacher's parameters costs more than the tokens "
            "it saves on this CPU"
        )
    )
    bounds = []
    for c in r["gate"]["criteria"]:
        column = f"{c['task']} {c['metric']}"
        if column not in table[first] or not table[first][column]:
            continue
        lower = c["metric"] == "bits_per_byte"
        if c.get("min_retention") is not None:
            limit = (
                cell(table, "teacher", column) / c["min_retention"]
                if lower
                else (cell(table, "teacher", column) * c["min_retention"])
            )
        else:
            limit = c["min_value"]
        bounds.append(
            f"{column} {'at most' if lower else 'at least'} {limit:.3g} (the untrained cut: "
            f"{of(first, column)}, the KD student: {of(kd, column)})"
        )
    bounds.append(
        f"measured acceptance at least {r['gate']['min_acceptance_rate']} (the untrained cut's "
        f"expected acceptance: {of(first, 'expected acceptance')})"
    )
    ran = pipeline_stages(r)
    top = sorted(((r["stage_seconds"].get(n, 0), n) for n in ran), reverse=True)[:3]
    share = sum(v for v, _ in top) / sum(r["stage_seconds"].get(n, 0) for n in ran)
    return [
        f"{r['max_steps']} training steps take the cut from {of(first, ppl)} to {of(kd, ppl)} bits per byte on the corpus's held-out "
        f"text (the teacher has {of('teacher', ppl)}), from {of(first, out)} to {of(kd, out)} on outside text, "
        f"and from {of(first, top1)} to {of(kd, top1)} top-1 agreement with the teacher's own answers to held-out "
        f"prompts. The KD student is ahead of the SFT baseline (same cut, sequences and steps) on "
        f"{'all' if ahead == 4 else ahead} of the four: bits per byte {pair(ppl)}, outside {pair(out)}, instruction top-1 {pair(top1)}, "
        f"full-vocabulary KL on test text {pair(kl, 2)}. That is one seed, so it is not a claim; the paired "
        f"three-seed comparison is [KD against SFT]({page.doc('kd-vs-sft.md')}), on the embedded teacher.",
        "",
        f"W8A8 keeps {100 * cell(table, kd, ppl) / cell(table, w8, ppl):.1f}% of the KD student's bits per byte "
        f"({of(w8, ppl)}) and {100 * cell(table, w8, top1) / cell(table, kd, top1):.1f}% of its instruction "
        f"top-1, "
        f"at {pct(cell(table, w8, 'on disk') / cell(table, kd, 'on disk'))} of its size on disk. As the teacher's "
        f"draft (4 tokens a step) the KD student is accepted at {of(kd, 'measured acceptance')} "
        f"(expected offline: {of(kd, 'expected acceptance')}), the SFT baseline at {of(sft, 'measured acceptance')}. "
        f"The teacher with the KD draft serves {drafted:.2f}x the tokens/s of the teacher alone (concurrency "
        f"{level}){pays}; the student alone serves "
        f"{cell(table, kd, 'tokens/s alone') / cell(table, 'teacher', 'tokens/s alone'):.1f}x the teacher's "
        f"tokens/s, W8A8 {cell(table, w8, 'tokens/s alone') / cell(table, 'teacher', 'tokens/s alone'):.1f}x. "
        f"The gate's bounds are set for a cut healed by {r['max_steps']} CPU steps: {'; '.join(bounds)}. "
        f"Of the wall time, the stages {', '.join(n for _, n in top)} take {pct(share)}.",
    ]


def block_train_step(page: Page) -> list[str]:
    r = result("train_step")
    s, ours, trl = r["setup"], r["distill"], r["trl"]
    blocks = round(ours["tokens"] / (s["seq_len"] - 1))
    return [
        "Measured with `make bench-env` once, then `.venv/bin/python bench/train_step.py` (results in "
        "`bench/results/train_step.json`). TRL's `GKDTrainer` "
        f"(trl {s['trl_version']}, `trl.experimental.gkd`, in its own `.venv-bench`; lmbda 0 and beta 0 make it "
        "forward KL on fixed sequences) and `distill train` train the same initial tiny.yaml student "
        f"({s['model_student']['num_layers']} layers, width {s['model_student']['hidden_size']}) against the "
        f"same tiny.yaml teacher on the same {blocks} corpus blocks of {s['seq_len']} tokens: {s['steps']} steps "
        f"of batch {s['batch']}, same lr schedule, AdamW and clipping, {s['cpus']}-core CPU, fp32, each run "
        f"{'twice' if s['repeats'] == 2 else str(s['repeats']) + ' times'} alternating, best kept:",
        "",
        f"| | distill (stored top-{s['top_k']}) | TRL GKDTrainer (teacher forward each step) | ratio |",
        "|---|---|---|---|",
        f"| training tokens/s (steady state) | {num(ours['tokens_per_s'])} | {num(trl['tokens_per_s'])} | "
        f"**{times(r['tokens_per_s_ratio_distill_over_trl'], 1)} faster** |",
        f"| peak memory of the training command | {num(ours['peak_rss_mb'])} MiB | {num(trl['peak_rss_mb'])} MiB | "
        f"**{times(r['peak_rss_ratio_trl_over_distill'], 1)} less** |",
        f"| end to end, counting `distill generate` ({r['generate']['stage_seconds']:.1f} s) | "
        f"{num(ours['end_to_end_tokens_per_s'])} tokens/s | {num(trl['end_to_end_tokens_per_s'])} tokens/s | "
        f"{times(r['end_to_end_ratio_distill_over_trl'])} |",
        "",
        "distill pays for the teacher once, in `distill generate`, and every later run (another loss, seed, "
        "student or LoRA rank) reuses the store; TRL pays for it at every step of every run. The divergences "
        f"match in kind (forward KL) but not in number: distill's is over the stored top-{s['top_k']} plus a "
        "tail bucket, TRL's over the full vocabulary.",
    ]


def block_train_processes(page: Page) -> list[str]:
    r = result("train_processes")
    one, two = r["runs"]["1 process"], r["runs"]["DDP 2 processes"]
    median = {k: sorted(x["seconds"] for x in v) for k, v in r["runs"].items()}
    mid = {k: (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2 for k, v in median.items()}
    g = r["global_batch"]
    slower = r["wall_ratio_2_over_1"] > 1
    return [
        "Issue #8 asked for the demo's training as 2 processes on this "
        f"2-core machine if that is not slower; it is {'slower' if slower else 'not slower'}. "
        "`bench/train_processes.py runs/tiny` trains tiny.yaml's student both ways on the same store with the "
        f"same global batch ({g} = 1 x {g} or 2 x {g // 2}: the same tokens, held-out KL equal to "
        f"{sci(r['val_kl_abs_difference'])}): DDP over 2 processes (gloo) runs the training loop "
        f"{times(r['loop_speed_ratio_2_over_1'])} as fast in tokens/s but takes "
        f"**{times(r['wall_ratio_2_over_1'])} the wall time** end to end (median of {len(one)} interleaved "
        f"repeats: {mid['DDP 2 processes']:.0f} s against {mid['1 process']:.0f} s), since two more Python "
        "processes start, import torch and Accelerate and join a process group, and the held-out evaluations "
        "do not split. Training that lasts minutes rather than seconds, or a machine with more cores, tips it "
        "the other way; `distill run recipes/tiny.yaml train.distributed.backend=ddp "
        f"train.distributed.num_processes=2 train.batch_size={g // 2}` runs the demo that way (the pipeline "
        "launches it with `accelerate launch`; the end-to-end pipeline test and test_distributed cover that "
        f"path). ({len(two)} runs each way are in `bench/results/train_processes.json`.)",
    ]


# --------------------------------------------------------------------------- on-policy


def onpolicy_gains(r: dict) -> dict[str, float]:
    warm = r["warm"]["val_acceptance"]
    return {mode: m["val_acceptance"] - warm for mode, m in r["mean_over_seeds"].items()}


def long_blocks(ratio: float) -> str:
    """vLLM's scoring speed over transformers' on long blocks, in words."""
    if ratio < 1:
        return f"transformers {times(1 / ratio, 1)} faster"
    return f"vLLM only {times(ratio, 2)} faster, once started"


def block_onpolicy_sampler(page: Page) -> list[str]:
    r = result("onpolicy")
    sampling = r["student_sampling"]
    starts = [s["vllm_engine_start_s"] for s in sampling.values()]

    def label(key: str, row: dict) -> str:
        if key == "student_tiny_yaml":
            return f"tiny.yaml's (2 x 128, {params(row['parameters'])} parameters)"
        width, layers = re.fullmatch(r"width(\d+)_layers(\d+)", key).groups()
        return f"{layers} x {width} ({params(row['parameters'])})"

    lines = [
        "Which sampler is faster depends on the student's size. Measured (`.venv/bin/python bench/onpolicy.py`, "
        f"`bench/results/onpolicy.json`; {r['batch']} prompts x {r['new_tokens']} new tokens, 2-core CPU, fp32, "
        "best of 2):",
        "",
        "| student | transformers `generate` | vLLM engine | vLLM / HF | weight reload |",
        "|---|---|---|---|---|",
    ]
    for key, row in sampling.items():
        lines.append(
            f"| {label(key, row)} | {num(row['transformers_tokens_per_s'])} tokens/s | "
            f"{num(row['vllm_tokens_per_s'])} tokens/s | {row['ratio_vllm_over_transformers']:.2f} | "
            f"{seconds(row['vllm_refresh_s'])} |"
        )
    lines += [
        "",
        f"So `hf` (no engine start, about {min(starts):.0f}-{max(starts):.0f} s here, and no reload) for toy "
        "students; `vllm` from tens of millions of parameters up, with `refresh_every` large enough that the "
        "reload (it goes through a safetensors file) stays small next to the steps between; on GPUs, where "
        "vLLM's batching and paged attention matter more, the gap widens.",
    ]
    return lines


def block_onpolicy_round(page: Page) -> list[str]:
    r = result("onpolicy")
    hf, vl, sc = r["rounds_transformers_sampler"], r["rounds_vllm_sampler"], r["teacher_scoring"]
    cap = result("teacher_capture")

    def part(row: dict, key: str) -> str:
        return f"{row[key]:.2f} s ({pct(row['share'][key])})"

    return [
        "Measured with `bench/onpolicy.py` (same run; the embedded teacher behind `vllm serve`, "
        f"tiny.yaml's student, {r['batch']} prompts x {r['new_tokens']} new tokens, top-{r['top_k']}, one "
        "optimizer step per round):",
        "",
        "| part of a round | `sampler: hf` | `sampler: vllm` (refresh every round) |",
        "|---|---|---|",
        f"| student sampling | {part(hf, 'sample_s')} | {part(vl, 'sample_s')} + {vl['refresh_s']:.2f} s reload "
        f"({pct(vl['share']['refresh_s'])}) |",
        f"| teacher scoring (vLLM server over loopback) | {part(hf, 'score_s')} | {part(vl, 'score_s')} |",
        f"| training step | {part(hf, 'train_s')} | {part(vl, 'train_s')} |",
        "",
        "Teacher scoring of those same sequences (all positions): the vLLM server "
        f"{num(sc['vllm_server_tokens_per_s'])} tokens/s, a transformers forward of the same teacher "
        f"{num(sc['transformers_tokens_per_s'])} tokens/s, "
        f"**{times(sc['ratio_vllm_over_transformers'], 1)}** in "
        f"{'vLLM' if sc['ratio_vllm_over_transformers'] >= 1 else 'transformers'}'s favour (HTTP included). On "
        f"long sequences the CPU picture changes ({cap['sequences']} blocks of {cap['seq_len']} tokens: "
        f"{long_blocks(cap['speed']['score_ratio_vllm_over_hf'])}, see the "
        f"[teacher stage's table]({page.doc('teacher.md#measured')})); on GPUs vLLM is the one to use.",
    ]


def block_onpolicy_vs_offline(page: Page) -> list[str]:
    r = result("onpolicy_vs_offline")
    means, gains = r["mean_over_seeds"], onpolicy_gains(r)
    labels = {
        "offline": "offline KD (teacher samples from the store)",
        "mixed": "mixed, lambda 0.5",
        "on_policy": "on-policy, lambda 1",
    }
    best_acc = max(means, key=lambda m: means[m]["val_acceptance"])
    best_kl = min(means, key=lambda m: means[m]["val_kl"])
    best_ce = min(means, key=lambda m: means[m]["val_ce"])
    tokens = [run["tokens"] for run in r["runs"].values()]
    lines = [
        "Measured with `.venv/bin/python bench/onpolicy_vs_offline.py` (about 20 min here; "
        "`bench/results/onpolicy_vs_offline.json`). The embedded teacher (tiny.yaml, perplexity 151) "
        f"samples a store of 2,048 completions (4 per corpus prompt, {r['new_tokens']} new tokens, vLLM) and "
        f"tiny.yaml's student (1.5 M parameters) first learns offline for {r['warm_steps']} steps (expected "
        f"acceptance {r['warm']['val_acceptance']:.3f}), then goes on for {r['steps']} more steps of batch "
        f"{r['batch']} from that checkpoint in each mode, three seeds each, the same trained token count (about "
        f"{num(round(sum(tokens) / len(tokens), -2))} completion tokens) and the same held-out evaluation:",
        "",
        f"| {r['steps']} more steps of | held-out expected acceptance (mean, min-max of 3 seeds) | gain over the "
        "start | held-out KL | held-out CE |",
        "|---|---|---|---|---|",
    ]
    for mode, label in labels.items():
        m = means[mode]
        acc = f"{m['val_acceptance']:.3f} ({m['val_acceptance_min']:.3f}-{m['val_acceptance_max']:.3f})"
        gain, kl, ce = f"{gains[mode]:+.3f}", f"{m['val_kl']:.3f}", f"{m['val_ce']:.2f}"
        lines.append(
            f"| {label} | {bold(acc, mode == best_acc)} | {bold(gain, mode == best_acc)} | "
            f"{bold(kl, mode == best_kl)} | {bold(ce, mode == best_ce)} |"
        )
    offline_max = means["offline"]["val_acceptance_max"]
    others_min = min(means[m]["val_acceptance_min"] for m in ("mixed", "on_policy"))
    kl_rise = means["on_policy"]["val_kl"] - means["offline"]["val_kl"]
    lines += [
        "",
        f"{'Every' if others_min > offline_max else 'Not every'} on-policy and mixed seed beats every offline "
        f"seed on acceptance; on-policy adds about {times(gains['on_policy'] / gains['offline'], 1)} the "
        "acceptance offline adds for the same tokens. The price is on the teacher's own text: the held-out KL "
        f"(measured on teacher-scored corpus blocks, not on the student's samples) "
        f"{'rises' if kl_rise > 0 else 'falls'} by {abs(kl_rise):.3f} and CE is unchanged within noise, which "
        "is what training on the student's distribution should do. From a random student, offline first is "
        "better (measured earlier: its samples are noise the teacher cannot teach from), so start on-policy runs "
        "from an offline-distilled checkpoint (`student.model`), or use the mix. `sampled_reverse_kl` learned "
        "far more slowly than `divergence` in our runs (it sees one token's logprob per position, not the top-k).",
    ]
    return lines


# --------------------------------------------------------------------------- serving


def speed(setup: dict, level: int) -> float:
    return setup["levels"][str(level)]["output_tokens_per_s"]


def vs_teacher(setups: dict, name: str, level: int) -> float:
    return speed(setups[name], level) / speed(setups["teacher"], level)


def block_serve_bench(page: Page) -> list[str]:
    serve = result("serve_bench")
    setups, cfg = serve["setups"], serve["settings"]
    levels = cfg["concurrency"]
    kd, sft = setups["teacher+student"], setups["teacher+baseline"]
    w8, fp = setups["student-w8a8"], setups["student"]
    greedy = "greedy" if cfg["temperature"] == 0 else f"temperature {cfg['temperature']}"
    lines = [
        f"Measured on this 2-core CPU machine (`{serve['command']}`, one run, defaults: {cfg['requests']} "
        f"requests per level, {cfg['prompt_tokens']} prompt + {cfg['max_tokens']} output tokens, "
        f"{cfg['num_speculative_tokens']} draft tokens per step, {greedy}; fp32; "
        "`bench/results/serve_bench.json`). The run: the default tiny recipe's teacher (5.5 M parameters, 4 "
        "layers), its KD student (forward KL, 200 steps, 1.5 M parameters, 2 layers) and the SFT baseline "
        "(`train.loss=ce`, same steps, same teacher-store sequences) as the undistilled draft; `distill "
        f"quantize` W8A8 of the KD student. (Where it comes from: {serve['source']}.)",
        "",
        "| setup | concurrency | output tok/s | vs teacher alone | TTFT p50 ms | TPOT ms | acceptance | mean "
        "acceptance length | model on disk |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in setups.items():
        label = SETUP_LABELS.get(name, name.replace("student-", "student ").replace("w8a8", "W8A8"))
        lv = [row["levels"][str(c)] for c in levels]
        ratio = "1" if name == "teacher" else " / ".join(times(vs_teacher(setups, name, c)) for c in levels)
        draft = name.startswith("teacher+")
        acc = (
            ""
            if row["acceptance_rate"] is None
            else bold(f"{row['acceptance_rate']:.3f}", name == "teacher+student")
        )
        length = (
            ""
            if row["mean_acceptance_length"] is None
            else bold(f"{row['mean_acceptance_length']:.2f}", name == "teacher+student")
        )
        tok = " / ".join(num(x["output_tokens_per_s"]) for x in lv)
        ttft = " / ".join(f"{x['ttft_ms_p50']:.1f}" for x in lv)
        tpot = " / ".join(f"{x['tpot_ms']:.2f}" for x in lv)
        lines.append(
            f"| {label} | {' / '.join(map(str, levels))} | {tok} | {ratio} | {ttft} | {tpot} | {acc} | {length} | "
            f"{'draft ' if draft else ''}{row['mib']:.1f} MiB |"
        )
    c0 = levels[0]
    no_speedup = all(vs_teacher(setups, n, c) < 1 for n in setups if n.startswith("teacher+") for c in levels)
    lines += [
        "",
        f"What it shows: the distilled draft is accepted **{kd['acceptance_rate'] / sft['acceptance_rate']:.0f}x "
        f"as often** as the SFT draft of the same size ({kd['acceptance_rate']:.3f} vs "
        f"{sft['acceptance_rate']:.3f}; a teacher step yields {kd['mean_acceptance_length']:.2f} tokens instead "
        f"of {sft['mean_acceptance_length']:.2f}), so the teacher with it runs at "
        f"{times(vs_teacher(setups, 'teacher+student', c0))} its own speed at concurrency {c0} where the SFT "
        f"draft drags it to {times(vs_teacher(setups, 'teacher+baseline', c0))}. "
        + (
            "On a CPU no draft makes the teacher faster: verifying k draft tokens costs a CPU about as much as "
            f"generating them, and this teacher is only {times(setups['teacher']['mib'] / kd['mib'], 1)} its "
            "draft's size; the speed-up from speculative decoding comes on GPUs, where decoding is memory-bound "
            "and verification nearly free, from the acceptance measured here. "
            if no_speedup
            else "A draft makes the teacher faster here at some level. "
        )
        + f"The W8A8 student is {' / '.join(times(speed(w8, c) / speed(fp, c)) for c in levels)} the fp32 "
        f"student's throughput at concurrency {' / '.join(map(str, levels))} and "
        f"{times(w8['mib'] / fp['mib'])} its size (embeddings and lm_head stay 16/32-bit, and at 1.5 M "
        "parameters they are most of the model). Every request of every setup completed (zero errors). p95 "
        "latencies on this shared 2-core machine swing with scheduling (in bench.json and the report).",
    ]
    return lines


def block_expected_acceptance(page: Page) -> list[str]:
    serve = result("serve_bench")
    cfg, exp, t1 = serve["settings"], serve["expected_acceptance"], serve["temperature_1"]
    kd, sft = serve["setups"]["teacher+student"], serve["setups"]["teacher+baseline"]

    def both(e: dict, m: dict, long: bool) -> str:
        inner, measured = ("mean acceptance length ", " measured") if long else ("", "")
        return (
            f"predicted **{e['acceptance_rate']:.3f}** ({inner}{e['mean_acceptance_length']:.2f}) against "
            f"**{m['acceptance_rate']:.3f}**{measured} ({m['mean_acceptance_length']:.2f})"
        )

    looser = t1["expected"]["acceptance_rate"] > t1["measured"]["acceptance_rate"]
    return [
        f"Measured on the demo's models (tiny.yaml, {cfg['requests']} prompts, k = {cfg['num_speculative_tokens']}, "
        f"greedy; `distill bench serve` on this machine; `bench/results/serve_bench.json`): the KD student "
        f"{both(exp['student'], kd, True)}; the SFT baseline {both(exp['sft'], sft, False)}. At temperature 1 the "
        f"prediction is looser: {t1['expected']['acceptance_rate']:.3f} predicted against "
        f"{t1['measured']['acceptance_rate']:.3f} measured for the KD student (mean acceptance length "
        f"{t1['expected']['mean_acceptance_length']:.2f} against {t1['measured']['mean_acceptance_length']:.2f})"
        + (", so read it as an upper estimate there." if looser else ".")
        + " The remaining differences at temperature 0 come from numerics (transformers vs vLLM's kernels can "
        "break a near-tie between two tokens the other way). The tests hold the prediction to vLLM's measurement "
        "(within 0.05) for a draft that copies the teacher, a draft with random weights, and the KD student of "
        "the end-to-end pipeline test.",
        "",
        "With `positions`, `steps`, `num_speculative_tokens` and `temperature`, the row is written to "
        "`eval/gate.json` under `models.<name>.expected_acceptance` (`student`, `sft`, or the `--model` name), "
        "shown in the report's score table (rows `expected acceptance_rate`, `expected mean_acceptance_length`, "
        "`expected alpha`), in `distill run`'s summary table (`expected acceptance`, next to `measured "
        "acceptance`), and printed by `distill eval`: `eval: student: expected acceptance as the teacher's draft "
        f"{exp['student']['acceptance_rate']:.3f}, mean acceptance length "
        f"{exp['student']['mean_acceptance_length']:.2f} (k={cfg['num_speculative_tokens']}, temperature "
        f"{cfg['temperature']:g}, {cfg['requests']} benchmark prompts)`.",
    ]


# --------------------------------------------------------------------------- the module map


def module_summary(path: Path) -> str:
    """The first paragraph of the module docstring, or its first sentence when that is long."""
    doc = ast.get_docstring(ast.parse(path.read_text()))
    if not doc:
        return "(no module docstring)"
    para = " ".join(doc.split("\n\n")[0].split())
    if len(para) <= 160:
        return para
    first = re.match(r"(.+?[.!?])(?=\s+[A-Z`(]|$)", para)
    return first.group(1) if first else para


def modules() -> list[tuple[str, int, str]]:
    """(path, depth, summary) for every module under distill/, a package's __init__ standing for it."""
    out = []

    def walk(folder: Path, depth: int) -> None:
        files = sorted(p for p in folder.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
        for p in files:
            out.append((p.relative_to(ROOT).as_posix(), depth, module_summary(p)))
        for sub in sorted(p for p in folder.iterdir() if (p / "__init__.py").exists()):
            out.append((sub.relative_to(ROOT).as_posix() + "/", depth, module_summary(sub / "__init__.py")))
            walk(sub, depth + 1)

    walk(ROOT / "distill", 0)
    return out


def block_modules(page: Page) -> list[str]:
    lines = []
    for path, depth, summary in modules():
        name = f"[`{path}`]({path})" if page.readme else f"`{path}`"
        lines.append(f"{'  ' * depth}- {name}: {summary}")
    return lines


BLOCKS: dict[str, Callable[[Page], list[str]]] = {
    "demo": block_demo,
    "demo-reading": block_demo_reading,
    "wall-times": block_wall_times,
    "tests": block_tests,
    "threads": block_threads,
    "figures": block_figures,
    "teacher-capture": block_teacher_capture,
    "backend-auto": block_backend_auto,
    "store-size": block_store_size,
    "kd-loss": block_kd_loss,
    "smollm2": block_smollm2,
    "smollm2-reading": block_smollm2_reading,
    "smollm2-prune": lambda page: block_smollm2(page, "smollm2_prune"),
    "cut-layers": block_cut_layers,
    "real-teacher": block_real_teacher,
    "fused-loss": block_fused_loss,
    "quant-serving": block_quant_serving,
    "end-to-end": block_end_to_end,
    "kd-loss-smollm2": block_kd_loss_smollm2,
    "train-step": block_train_step,
    "train-processes": block_train_processes,
    "onpolicy-sampler": block_onpolicy_sampler,
    "onpolicy-round": block_onpolicy_round,
    "onpolicy-vs-offline": block_onpolicy_vs_offline,
    "serve-bench": block_serve_bench,
    "expected-acceptance": block_expected_acceptance,
    "modules": block_modules,
}

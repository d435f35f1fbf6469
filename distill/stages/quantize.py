"""The quantize stage: llm-compressor turns the student into compressed-tensors models under
`runs/<name>/quant/<scheme>/` (whether this machine's vLLM can serve each: distill.vllm.kernels).

llm-compressor cannot share vLLM's environment (their pins exclude each other), so `oneshot` runs in
`.venv-quant` as a subprocess (`distill/quant_worker.py`); this side picks the calibration sequences,
keeps the outputs atomic and reusable, and records them in the run manifest.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from distill import processes
from distill.artifacts import (
    QUANT_RECORD,
    atomic_write_json,
    begin_directory,
    commit_directory,
    hash_json,
    read_json,
    remove_stale_temps,
)
from distill.config import RecipeConfig
from distill.errors import DistillError
from distill.run import Run, RunDir

ROOT = Path(__file__).resolve().parents[2]  # the checkout: .venv-quant sits beside .venv
WORKER = Path(__file__).parents[1] / "quant_worker.py"
QUANT_PYTHON_ENV = "DISTILL_QUANT_PYTHON"


def quant_python() -> Path:
    path = Path(os.environ.get(QUANT_PYTHON_ENV) or ROOT / ".venv-quant" / "bin" / "python")
    if not path.exists():
        raise DistillError(
            f"llm-compressor's environment is missing: {path} does not exist (run `make setup`, which "
            f"builds .venv-quant, or set {QUANT_PYTHON_ENV})"
        )
    return path


def student_dir(run: Run) -> Path:
    path = run.student
    if not (path / "config.json").exists():
        raise DistillError(f"no student to quantize: {path} does not exist (run `distill train` first)")
    return path


def calibration(run: Run) -> tuple[list[list[int]], dict]:
    """`quantize.calibration_samples` token sequences of up to `calibration_seq_len`: the teacher
    store's sequences when the run has one (the data the student learned from), else corpus blocks."""
    import numpy as np

    from distill.store import TeacherStore

    q, store = run.recipe.quantize, run.store
    if (store / "manifest.json").exists():
        rows = []
        for capture in TeacherStore(store).rows():
            rows.append(list(capture.input_ids)[: q.calibration_seq_len])
            if len(rows) == q.calibration_samples:
                break
        return rows, {"source": "teacher store", "path": str(store), "sequences": len(rows)}
    data = run.data
    tokens = np.load(data.tokens_dir / "train.npy", mmap_mode="r")
    n = min(q.calibration_samples, len(tokens) // q.calibration_seq_len)
    rows = [tokens[i * q.calibration_seq_len : (i + 1) * q.calibration_seq_len].tolist() for i in range(n)]
    return rows, {"source": "corpus train blocks", "corpus": data.corpus.content_hash, "sequences": n}


def settings(q) -> dict:
    """The quantize section as a stage input: an empty `lm_head` is left out, so runs made before the
    option existed are not redone."""
    return {k: v for k, v in q.model_dump().items() if k != "lm_head" or v}


def quantize(run: Run, schemes: list[str] | None = None, log=print) -> dict[str, Path]:
    """Quantize the run's student with each scheme (default: `quantize.schemes`); reuse an output whose
    student, scheme and calibration are unchanged. Returns {scheme: directory}."""
    from distill.models import model_fingerprint

    started = time.perf_counter()
    recipe = run.recipe
    student = student_dir(run)
    schemes = schemes or list(recipe.quantize.schemes)
    python = quant_python()
    rows, source = calibration(run)
    fingerprint = model_fingerprint(student, recipe.cache_path)
    out_root = run.quant
    remove_stale_temps(out_root)  # what a killed quantize left: never read as a model, gone now
    done = {}
    for scheme in schemes:
        out = out_root / scheme
        key = hash_json(
            {
                "student": [fingerprint["config_hash"], fingerprint["weights_hash"]],
                "scheme": scheme,
                "calibration": hash_json(rows),
                "seq_len": recipe.quantize.calibration_seq_len,
                # only when set: outputs quantized before the option existed keep their key
                **({"lm_head": True} if scheme in recipe.quantize.lm_head else {}),
            }
        )
        if (out / QUANT_RECORD).exists() and read_json(out / QUANT_RECORD).get("key") == key:
            log(f"quantize: {scheme}: {out} (reused: same student and calibration)")
            done[scheme] = out
            continue
        log(f"quantize: {scheme}: llm-compressor oneshot on {len(rows)} sequences ({source['source']})")
        tmp = begin_directory(out)
        calib = tmp.with_name(f".{scheme}.calibration.tmp-{os.getpid()}")
        calib.write_text(json.dumps(rows))
        log_path = out_root / f"{scheme}.log"
        began = time.perf_counter()
        cmd = [str(python), str(WORKER), "--model", str(student), "--out", str(tmp), "--scheme", scheme]
        cmd += ["--calibration", str(calib), "--samples", str(len(rows))]
        cmd += ["--seq-len", str(recipe.quantize.calibration_seq_len)]
        if recipe.student.trust_remote_code:
            cmd.append("--trust-remote-code")
        if scheme in recipe.quantize.lm_head:
            cmd.append("--lm-head")
        with open(log_path, "w") as fh:
            status = processes.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
        calib.unlink()
        if status != 0:
            tail = " | ".join(log_path.read_text().strip().splitlines()[-3:])
            raise DistillError(
                f"quantize: {scheme}: llm-compressor exited with status {status}: {tail} (log: {log_path})"
            )
        record = {
            "key": key,
            "scheme": scheme,
            "student": fingerprint,
            "calibration": {**source, "seq_len": recipe.quantize.calibration_seq_len},
            "lm_head": scheme in recipe.quantize.lm_head,
            "seconds": round(time.perf_counter() - began, 3),
            "bytes": sum(p.stat().st_size for p in tmp.iterdir() if p.is_file()),
        }
        atomic_write_json(tmp / QUANT_RECORD, record)
        commit_directory(tmp, out)
        log(f"quantize: {scheme}: {out} ({record['bytes'] / 2**20:.1f} MiB, {record['seconds']:.0f}s)")
        done[scheme] = out
    run.manifest.record(
        "quantize",
        "done",
        hash_json({"schemes": schemes, "quantize": settings(recipe.quantize)}),
        {scheme: str(path) for scheme, path in done.items()},
        time.perf_counter() - started,
    )
    return done


def pipeline_stages(recipe: RecipeConfig) -> list:
    """How `distill run` drives this stage (see distill.stages.Stage)."""
    from distill.stages import Stage

    layout = RunDir(recipe.run_dir)
    on = recipe.pipeline.quantize and recipe.quantize.schemes
    return [
        Stage(
            "quantize",
            {"quantize": settings(recipe.quantize)},
            run=lambda ctx, redo: {
                s: str(p) for s, p in quantize(ctx.run(teacher=None), log=ctx.log).items()
            },
            outputs=lambda ctx: [layout.quantized(s) / QUANT_RECORD for s in recipe.quantize.schemes],
            plan=lambda ctx: [f"distill quantize {layout.path}   (.venv-quant: llm-compressor oneshot)"],
            off=None if on else "pipeline.quantize is false",
        )
    ]

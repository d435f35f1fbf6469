"""Peak memory and time of distill's chunked sparse KD loss vs a plain dense one, forward + backward.

    .venv/bin/python bench/kd_loss.py [--batch 4 --seq 1024 --vocab 128256 --k 32]

Both compute forward KL (temperature 1) from the student's logits (B, T, V) at Llama 3's vocabulary:
- plain: the textbook dense loss, with the teacher's full logits (B, T, V) as its target;
- distill: `distill.losses.kd_loss` with the teacher's stored top-k (B, T, K) and a tail bucket.
Each variant runs in its own process; peak memory is that process's peak RSS minus its RSS once the inputs
exist (the logits, and for plain the dense teacher logits, are counted separately), sampled every
millisecond from /proc/self/statm while the loss runs. fp32 on CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


class PeakSampler:
    """Highest RSS seen while running, sampled every millisecond by a thread (portable, unlike VmHWM resets)."""

    def __enter__(self):
        import threading

        self.peak, self._stop = rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def run_variant(variant: str, batch: int, seq: int, vocab: int, k: int) -> dict:
    import torch

    from distill.losses import SparseTeacher, kd_loss

    torch.manual_seed(0)
    student = torch.randn(batch, seq, vocab).requires_grad_()
    ids = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.bool)
    if variant == "plain":
        teacher = torch.randn(batch, seq, vocab)
    else:
        lps, top = torch.randn(batch, seq, vocab).log_softmax(-1).topk(k, -1)  # what the store holds
    inputs_mb = rss_mb()
    start = time.perf_counter()
    with PeakSampler() as sampler:
        if variant == "plain":
            log_q = student.float().log_softmax(-1)
            log_p = teacher.float().log_softmax(-1)
            loss = (log_p.exp() * (log_p - log_q)).sum(-1)[:, :-1][mask[:, :-1]].sum()
        else:
            loss = kd_loss(student, SparseTeacher(top, lps), mask, ids, "forward_kl").total
        loss.backward()
    seconds = time.perf_counter() - start
    return {
        "variant": variant,
        "seconds": seconds,
        "inputs_mb": inputs_mb,
        "peak_mb": sampler.peak,
        "loss_peak_mb": sampler.peak - inputs_mb,
        "logits_mb": student.numel() * 4 / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--variant", choices=["plain", "distill"])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "kd_loss.json"))
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.batch, args.seq, args.vocab, args.k)))
        return
    results = {"batch": args.batch, "seq": args.seq, "vocab": args.vocab, "k": args.k}
    for variant in ("plain", "distill"):
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--vocab",
            str(args.vocab),
            "--k",
            str(args.k),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    results["loss_memory_ratio_plain_over_distill"] = (
        results["plain"]["loss_peak_mb"] / results["distill"]["loss_peak_mb"]
    )
    results["total_memory_ratio_plain_over_distill"] = (
        results["plain"]["peak_mb"] / results["distill"]["peak_mb"]
    )
    results["time_ratio_distill_over_plain"] = results["distill"]["seconds"] / results["plain"]["seconds"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

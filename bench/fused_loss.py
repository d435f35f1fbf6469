"""Peak memory and time of the fused output layer + KD loss against the unfused ones, forward + backward.

    .venv/bin/python bench/fused_loss.py [--batches 4 6 --seq 1024 --hidden 2048 --vocabs 128256 49152 --k 32]

From the student's last hidden states (B, T, H) and its output layer (V x H) to the gradients of both, at
Llama 3's vocabulary (128,256) and SmolLM2's (49,152), H = 2,048 (Llama 3.2 1B, a Llama 3 8B student), at
B x T = 4 x 1,024 and 6 x 1,024 (the largest whose plain loss fits this 24 GB machine):
- plain: the logits (B, T, V), then the textbook dense forward KL against the teacher's full logits;
- chunked: the logits (B, T, V), then `distill.losses.kd_loss` (top-k store, tail bucket; train.fused_loss off);
- fused: `distill.losses.fused_kd_loss` from the hidden states (train.fused_loss auto): the logits a chunk
  at a time, never (B, T, V).
Each variant runs in its own process. Its loss peak is the process's peak RSS while the step runs minus its
RSS once the inputs exist (the hidden states, the layer, the teacher's targets). The gradients start as
None, as `distill train` leaves them between steps (`zero_grad(set_to_none=True)`), so every variant's
peak includes its gradients of the hidden states and the layer: the layer's, V x H, is the floor no loss
goes under (1,002 MiB at V = 128,256, H = 2,048), while the plain loss grows with B x T. fp32 on CPU. The
fused and chunked losses are also checked equal in value.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from kd_loss import PeakSampler, rss_mb  # noqa: E402  (bench/ scripts share their measuring)

from distill.losses import FUSED_CHUNK_ELEMENTS, FUSED_CHUNK_TOKENS  # noqa: E402


def run_variant(
    variant: str, batch: int, seq: int, hidden_size: int, vocab: int, k: int, chunk_elements: int
) -> dict:
    import torch

    from distill.losses import SparseTeacher, fused_kd_loss, kd_loss

    chunk_elements = chunk_elements or FUSED_CHUNK_ELEMENTS
    torch.manual_seed(0)
    hidden = (torch.randn(batch, seq, hidden_size) / hidden_size**0.5).requires_grad_()
    layer = torch.nn.Linear(hidden_size, vocab, bias=False)
    ids = torch.randint(0, vocab, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.bool)
    g = torch.Generator().manual_seed(1)
    if variant == "plain":
        teacher = torch.randn(batch, seq, vocab, generator=g)
    else:  # what the store holds: the top-k of a teacher distribution, made a row at a time
        top = torch.randint(0, vocab, (batch, seq, k), generator=g)
        lps = torch.randn(batch, seq, k, generator=g).log_softmax(-1) - 0.1
    # one small step first, outside the measurement: the first checkpointed call imports and sets up
    # torch's machinery (seconds, once per training process)
    small = (torch.randn(1, 8, hidden_size, requires_grad=True), torch.nn.Linear(hidden_size, 16, bias=False))
    few = SparseTeacher(torch.randint(0, 16, (1, 8, 4)), torch.randn(1, 8, 4).log_softmax(-1))
    fused_kd_loss(*small, few, mask[:1, :8], ids[:1, :8] % 16).total.backward()
    kd_loss(small[1](small[0]), few, mask[:1, :8], ids[:1, :8] % 16).total.backward()
    hidden.grad = layer.weight.grad = None
    inputs_mb = rss_mb()
    start = time.perf_counter()
    with PeakSampler() as sampler:
        if variant == "plain":
            log_q = layer(hidden).float().log_softmax(-1)
            log_p = teacher.float().log_softmax(-1)
            loss = (log_p.exp() * (log_p - log_q)).sum(-1)[:, :-1][mask[:, :-1]].sum()
        elif variant == "chunked":
            loss = kd_loss(layer(hidden), SparseTeacher(top, lps), mask, ids, "forward_kl").total
        else:
            loss = fused_kd_loss(
                hidden, layer, SparseTeacher(top, lps), mask, ids, "forward_kl", chunk_elements=chunk_elements
            ).total
        loss.backward()
    seconds = time.perf_counter() - start
    return {
        "variant": variant,
        "seconds": seconds,
        "inputs_mb": inputs_mb,
        "peak_mb": sampler.peak,
        "loss_peak_mb": sampler.peak - inputs_mb,
        "logits_mb": batch * seq * vocab * 4 / 2**20,
        "weight_grad_mb": vocab * hidden_size * 4 / 2**20,
        "hidden_grad_mb": batch * seq * hidden_size * 4 / 2**20,
        "loss": loss.item(),
    }


def measure(args, batch: int, vocab: int) -> dict:
    out = {}
    for variant in ("plain", "chunked", "fused"):
        cmd = [sys.executable, __file__, "--variant", variant, "--batches", str(batch), "--seq", str(args.seq),
               "--hidden", str(args.hidden), "--vocabs", str(vocab), "--k", str(args.k)]  # fmt: skip
        # NOTE: glibc serves allocations under its (growing) mmap threshold from heaps it keeps after free;
        # a fixed 1 MiB threshold gives every tensor its own mapping, so RSS falls when a tensor is freed
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        run = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        out[variant] = json.loads(run.stdout.strip().splitlines()[-1])
        print(
            batch * args.seq,
            vocab,
            variant,
            f"{out[variant]['seconds']:.1f} s",
            f"{out[variant]['loss_peak_mb']:.0f} MiB",
            flush=True,
        )
    plain, chunked, fused = out["plain"], out["chunked"], out["fused"]
    out["ratios"] = {
        "memory_plain_over_fused": plain["loss_peak_mb"] / fused["loss_peak_mb"],
        "memory_chunked_over_fused": chunked["loss_peak_mb"] / fused["loss_peak_mb"],
        "time_fused_over_plain": fused["seconds"] / plain["seconds"],
        "time_fused_over_chunked": fused["seconds"] / chunked["seconds"],
        "loss_fused_vs_chunked_relative": abs(fused["loss"] - chunked["loss"]) / abs(chunked["loss"]),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 6])
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[128_256, 49_152])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--variant", choices=["plain", "chunked", "fused"])
    parser.add_argument(
        "--chunk-elements", type=int, default=None, help="the fused loss's (default: distill's)"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "fused_loss.json"))
    args = parser.parse_args()
    if args.variant:
        row = run_variant(
            args.variant, args.batches[0], args.seq, args.hidden, args.vocabs[0], args.k, args.chunk_elements
        )
        print(json.dumps(row))
        return
    results = {
        "seq": args.seq,
        "hidden": args.hidden,
        "k": args.k,
        "chunk_elements": FUSED_CHUNK_ELEMENTS,
        "chunk_tokens": FUSED_CHUNK_TOKENS,
        "machine": f"{os.cpu_count()} CPU cores, no GPU, fp32",
        "sizes": {
            str(b * args.seq): {"batch": b, "vocabs": {str(v): measure(args, b, v) for v in args.vocabs}}
            for b in args.batches
        },
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(
        json.dumps({n: {v: r["ratios"] for v, r in x["vocabs"].items()} for n, x in results["sizes"].items()})
    )


if __name__ == "__main__":
    main()

"""Which of the teacher's layers a cut student should keep: untrained cuts of SmolLM2-135M-Instruct (30
layers), each set against the teacher on held-out text, in one run.

    .venv/bin/python bench/cut_layers.py [--documents 24 --tokens 256]

- Cuts: evenly spaced (what `student.cut.num_layers` gives), chosen by importance (distill.pruning,
  `select: importance`: the contiguous block of least angular distance between its input and output
  hidden states, on `--calibration` corpus train documents, dropped), chosen by KL (`select: kl`: the
  block whose removal moves the teacher's next-token distribution least on those documents, dropped) and "first a + last b" (one contiguous middle block
  dropped) at 10, 12, 15 and 20 layers, plus the splits that keep the first layers and the last one or
  two.
- Each cut holds the teacher's embeddings, final norm, head and kept decoder layers, in order: the
  weights `student.cut` writes, built in memory. fp32, transformers.
- Measured with the eval stage's own functions (distill.heldout.measure/summarize): bits per byte on
  `--documents` corpus test documents and as many outside documents (text not in the corpus), and, on
  the test documents, full-vocabulary KL(teacher || cut) and top-1 agreement. Whole documents up to
  `--tokens` tokens, spread over each source.
Ratios to the teacher are what to read; the ranking is what the recipe's `student.cut.layers` follows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "smollm2-135m.yaml"


SIZES = (10, 12, 15, 20)


def cuts(total: int, importance: dict) -> dict[str, list[int]]:
    """name -> kept layers (ascending)."""
    from types import SimpleNamespace

    from distill.models import cut_layers
    from distill.pruning import keep_layers

    out = {}
    for n in SIZES:
        out[f"even {n}"] = cut_layers(total, SimpleNamespace(layers=None, num_layers=n))
        out[f"importance {n}"] = keep_layers(importance, n)
        out[f"kl {n}"] = keep_layers(importance, n, by="kl")
    for first, last in ((5, 5), (4, 6), (3, 7), (3, 9), (4, 8), (2, 10), (7, 8), (5, 10), (10, 10)):
        out[f"first {first} + last {last}"] = [*range(first), *range(total - last, total)]
    for first, last in ((8, 2), (9, 1), (11, 1)):
        out[f"first {first} + last {last}"] = [*range(first), *range(total - last, total)]
    return out


def cut_model(teacher, layers: list[int]):
    """A new model holding the teacher's embeddings, norm, head and `layers` (renumbered 0..N-1): the
    weights `student.cut` writes, built in memory."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from distill.models import LAYER_PREFIX

    total = teacher.config.num_hidden_layers
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == total:
        config.layer_types = [config.layer_types[i] for i in layers]
    renumber = {old: new for new, old in enumerate(layers)}
    state = {}
    for name, tensor in teacher.state_dict().items():
        if name.startswith(LAYER_PREFIX):
            index, rest = name[len(LAYER_PREFIX) :].split(".", 1)
            if int(index) not in renumber:
                continue
            name = f"{LAYER_PREFIX}{renumber[int(index)]}.{rest}"
        state[name] = tensor
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    return model.eval()


class CachedTeacher:
    """The teacher's logits for each batch computed once and replayed for every cut (measure calls the
    teacher on the same batches in the same order for each model): one teacher pass instead of one per
    cut. About 1.2 GB of fp32 logits for 24 documents of 256 tokens at V = 49,152."""

    def __init__(self, model):
        self.model, self.training, self.seen = model, False, {}

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def __call__(self, input_ids, attention_mask):
        key = (input_ids.numpy().tobytes(), attention_mask.numpy().tobytes())
        if key not in self.seen:
            self.seen[key] = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return self.seen[key]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--documents", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--calibration", type=int, default=32, help="corpus train documents for importance")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cut_layers.json"))
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.config import load_recipe
    from distill.heldout import Documents, measure, outside_documents, summarize
    from distill.models import local_models
    from distill.pruning import layer_importance, window_kl
    from distill.stages.prepare import prepare

    # the GGUF converted (cached); a run directory of its own, so that a real run's is never touched
    overrides = ["tracking.wandb=disabled", f"runs_dir={tempfile.mkdtemp(prefix='distill-bench-')}"]
    recipe = local_models(load_recipe(RECIPE, overrides))
    data = prepare(recipe)
    teacher_dir = Path(recipe.teacher.model)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    texts = {"test": data.corpus.texts("test"), "outside": [d["text"] for d in outside_documents()]}
    docs = {s: Documents.encode(t, tokenizer, args.tokens, args.documents) for s, t in texts.items()}
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    total = teacher.config.num_hidden_layers
    # the teacher's layer importance on calibration text: corpus train documents, apart from those measured
    calibration = Documents.encode(data.corpus.texts("train"), tokenizer, args.tokens, args.calibration)
    importance = layer_importance(teacher, calibration.ids, drop=[total - n for n in SIZES])
    importance["window_kl"] = {total - n: window_kl(teacher, calibration.ids, total - n) for n in SIZES}
    rows = {"teacher": {"layers": list(range(total)), **{
        s: summarize(measure(teacher, None, d)) for s, d in docs.items()}}}  # fmt: skip
    started = time.perf_counter()
    cached = CachedTeacher(teacher)
    for name, layers in cuts(total, importance).items():
        model = cut_model(teacher, layers)
        rows[name] = {
            "layers": layers,
            "test": summarize(measure(model, cached, docs["test"])),
            "outside": summarize(measure(model, None, docs["outside"])),
        }
        print(f"{name:>20}: test {rows[name]['test']['bits_per_byte']:.2f} bpb, "
              f"outside {rows[name]['outside']['bits_per_byte']:.2f}, KL {rows[name]['test']['kl']:.2f}, "
              f"top-1 {rows[name]['test']['top1_agreement']:.3f}", flush=True)  # fmt: skip
    result = {
        "teacher": str(recipe.teacher.model),
        "teacher_layers": total,
        "documents": {s: len(d.ids) for s, d in docs.items()},
        "tokens": args.tokens,
        "seconds": time.perf_counter() - started,
        "calibration": {"documents": len(calibration.ids), "tokens": importance["tokens"]},
        "importance": importance,
        "cuts": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

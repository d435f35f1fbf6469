"""`distill run`: chain the stages of a recipe and print a summary.

Stages built so far: prepare, pretrain (when the recipe has a tiny teacher). The rest of the pipeline
(generate, train, eval, quantize, serve) joins here as it lands.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from distill.config import RecipeConfig
from distill.prepare import prepare
from distill.pretrain import TeacherSummary, pretrain

STAGES = ("prepare", "pretrain", "generate", "train", "eval", "quantize", "serve", "bench", "promote")
CHAINED = ("prepare", "pretrain")


@dataclass
class RunSummary:
    recipe: RecipeConfig
    teacher: TeacherSummary | None
    seconds: float

    def lines(self) -> list[str]:
        out = [f"run: {self.recipe.run_dir}"]
        t = self.teacher
        if t is not None:
            out += [
                f"teacher: {t.path}{' (reused from cache)' if t.reused else ''}",
                f"  parameters {t.parameters / 1e6:.2f}M, vocab {t.vocab_size}, {t.steps} steps, {t.tokens:,} tokens",
                f"  held-out (test) loss {t.test_loss:.3f} nats, perplexity {t.test_perplexity:.1f}",
                f"  uniform over the vocabulary: loss {t.uniform_loss:.3f}, perplexity {t.vocab_size}",
            ]
        pending = [s for s in STAGES if s not in CHAINED]
        out.append(f"not chained by `distill run` yet: {', '.join(pending)}")
        out.append(f"done in {self.seconds:.0f}s")
        return out


def run(recipe: RecipeConfig, resume: bool = True, progress: bool = True) -> RunSummary:
    """Run every built stage of `recipe` in order; a rerun reuses cached results."""
    started = time.perf_counter()
    prepare(recipe)
    teacher = pretrain(recipe, resume=resume, progress=progress) if recipe.teacher.tiny else None
    return RunSummary(recipe, teacher, time.perf_counter() - started)

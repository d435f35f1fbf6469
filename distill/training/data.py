"""What the loop trains on: token blocks of the corpus, or the sequences of a teacher store with their
top-k, and the order it visits them in (a pure function of the seed and the position, for exact resume)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from distill.errors import DistillError


class TokenBlocks:
    """Non-overlapping blocks of `seq_len` tokens cut from one flat token array."""

    def __init__(self, path: Path, seq_len: int):
        tokens = np.load(path, mmap_mode="r")
        self.num_blocks = len(tokens) // seq_len
        if self.num_blocks == 0:
            raise DistillError(f"{path}: {len(tokens)} tokens is less than one block of {seq_len}")
        self.blocks = tokens[: self.num_blocks * seq_len].reshape(self.num_blocks, seq_len)

    @property
    def num_items(self) -> int:
        return self.num_blocks

    def batch(self, indices) -> dict[str, Any]:
        """input_ids (B, T) and loss_mask (B, T): every position but the last predicts the next token."""
        import torch

        ids = torch.from_numpy(self.blocks[np.asarray(indices)].astype(np.int64))
        return {"input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool)}


class StoreItems:
    """The sequences of a teacher store with their top-k, decoded once and batched by index."""

    def __init__(self, path: Path, pad_id: int):
        from distill.store import TeacherStore

        store = TeacherStore(path)
        store.require_complete()
        self.k, self.pad_id = store.k, pad_id
        self.teacher_draws = store.teacher_draws
        self.rows = list(store.rows())
        if not self.rows:
            raise DistillError(f"teacher store {path} is empty: run `distill generate` first")

    @property
    def num_items(self) -> int:
        return len(self.rows)

    def batch(self, indices) -> dict[str, Any]:
        from distill.store import collate

        return collate([self.rows[i] for i in indices], self.k, self.pad_id)


class CrossStoreItems(StoreItems):
    """A teacher store read by a student with another tokenizer: each row's text re-tokenized and
    aligned with the teacher's tokens (distill.crosstok), batch by batch."""

    def __init__(self, path: Path, teacher_tokenizer: Path, student_tokenizer: Path, context: int, pad_id: int,
                 cache: Path | None = None):  # fmt: skip
        from distill.crosstok import Retokenizer
        from distill.tokenizer import load_tokenizer

        super().__init__(path, pad_id)
        self.retokenizer = Retokenizer(
            load_tokenizer(teacher_tokenizer), load_tokenizer(student_tokenizer), context, cache_dir=cache
        )

    def batch(self, indices) -> dict[str, Any]:
        from distill.crosstok import collate_cross

        return collate_cross([self.rows[i] for i in indices], self.retokenizer, self.pad_id)


class BlockOrder:
    """Global position p -> block index: a fresh seeded permutation per epoch."""

    def __init__(self, num_blocks: int, seed: int):
        self.num_blocks, self.seed, self._perms = num_blocks, seed, {}

    def indices(self, start: int, count: int) -> list[int]:
        out = []
        for pos in range(start, start + count):
            epoch, offset = divmod(pos, self.num_blocks)
            if epoch not in self._perms:
                self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)}
            out.append(int(self._perms[epoch][offset]))
        return out

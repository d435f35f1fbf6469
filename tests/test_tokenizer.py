import numpy as np

from distill.tokenizer import BOS, EOS, load_tokenizer, train_tokenizer


def test_tokenizer_round_trips_text(prepared):
    tok = load_tokenizer(prepared.tokenizer_dir)
    assert len(tok) == 4096
    text = "def f(x):\n    return x ** 2  # ünïcode ✓"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.bos_token == BOS and tok.eos_token == EOS
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_training_is_deterministic(prepared, tmp_path):
    again = train_tokenizer(prepared.corpus, 4096, tmp_path)
    assert (again / "tokenizer.json").read_bytes() == (prepared.tokenizer_dir / "tokenizer.json").read_bytes()


def test_token_arrays_frame_each_document(prepared):
    tok = load_tokenizer(prepared.tokenizer_dir)
    train = np.load(prepared.tokens_dir / "train.npy")
    assert train.dtype == np.uint16 and train.max() < len(tok)
    n_docs = prepared.corpus.manifest["documents"]["train"]
    assert int((train == tok.eos_token_id).sum()) == n_docs
    assert int((train == tok.bos_token_id).sum()) == n_docs
    assert len(train) > 300_000

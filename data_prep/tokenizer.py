"""Tokenizer for the shards: an existing HF tokenizer, or a byte-level BPE trained on the corpus.

Either way it is saved in Hugging Face format in OUTPUT/tokenizer/ (loadable with
`transformers.AutoTokenizer`), with an EOS token (the document separator) and a pad token. Its hash
(over the saved files) goes into the manifest so the loader and the models can check they agree.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

EOS = "<|endoftext|>"
PAD = "<|pad|>"
MIN_TRAINED_VOCAB = 256 + 2
"""A trained byte-level BPE holds every byte plus EOS and PAD; anything above that is merges."""


class TokenizerError(RuntimeError):
    """The tokenizer cannot be used for the shards (not found, not fast, no EOS token)."""


def tokenizer_sha256(directory: Path) -> str:
    """Hash of every file of a saved tokenizer, names included, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(directory).iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style pre-tokenisation, no unknown tokens) with EOS and PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   bos_token=None, unk_token=None, model_max_length=1 << 30)


def load_pretrained(name_or_dir: str):
    """Any HF fast tokenizer; a missing pad token becomes the EOS token (pads are never trained on)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_dir)
    except Exception as e:
        raise TokenizerError(f"cannot load tokenizer {name_or_dir!r}: {type(e).__name__}: {e}") from e
    if not tok.is_fast:
        raise TokenizerError(f"tokenizer {name_or_dir!r} has no fast (Rust) implementation; data_prep needs one")
    if tok.eos_token_id is None:
        raise TokenizerError(f"tokenizer {name_or_dir!r} defines no eos_token; documents are separated by EOS")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def save(tok, directory: Path, name: str) -> dict:
    """Saves the tokenizer and returns its manifest entry."""
    directory.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(directory))
    return describe(tok, directory, name)


def describe(tok, directory: Path, name: str) -> dict:
    return {
        "name": name,
        "path": directory.name,
        "vocab_size": len(tok),
        "sha256": tokenizer_sha256(directory),
        "eos_token": tok.eos_token,
        "eos_token_id": tok.eos_token_id,
        "pad_token": tok.pad_token,
        "pad_token_id": tok.pad_token_id,
    }

"""Tokenizer for the shards: an existing HF tokenizer, or a byte-level BPE trained on the corpus.

Either way it is saved in Hugging Face format in OUTPUT/tokenizer/ (loadable with
`transformers.AutoTokenizer`), with an EOS token (the document separator) and a pad token. Its hash
(over the saved files) goes into the manifest so the loader and the models can check they agree.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

EOS = "<|endoftext|>"
PAD = "<|pad|>"
MIN_TRAINED_VOCAB = 256 + 2
"""A trained byte-level BPE holds every byte plus EOS and PAD; anything above that is merges."""


PIECE_CHARS = 1 << 16
"""Texts are tokenized in pieces of at most about this many characters. A tokenizer's working memory
is some 200x the text it is given (per-byte alignment tables): one 50 MB document took 10.9 GB."""
_WORD_GAP = re.compile(r"(?<=\S)\s(?=\S)")
"""A single whitespace character between two words: cutting just before it splits no pre-token of a
byte-level BPE (the space goes with the next word), and the encoder checks each cut besides."""
CANDIDATE_CUTS = 32


def pieces(text: str, size: int = PIECE_CHARS, neutral: Callable[[str, int], bool] | None = None,
           plain_cuts: list[int] | None = None) -> Iterator[str]:
    """`text` in consecutive pieces of at most `size` characters, each cut before a word gap that
    `neutral(text, cut)` accepts (when given). A text without one in half a piece (a base64 blob) is
    cut plainly, and the cut's offset appended to `plain_cuts`: ids next to it may differ."""
    start = 0
    while len(text) - start > size:
        cut = _cut(text, start, size, neutral)
        if cut is None:
            cut = start + size
            if plain_cuts is not None:
                plain_cuts.append(cut)
        yield text[start:cut]
        start = cut
    yield text[start:]


def _cut(text: str, start: int, size: int, neutral) -> int | None:
    end = start + size
    near = max(end - 4096, start + size // 2)
    for lo, hi in ((near, end), (start + size // 2, near)):  # the nearest gaps first; rarely further back
        gaps = reversed([m.start() for m in _WORD_GAP.finditer(text, max(lo, start + 1), hi)])
        for cut in itertools.islice(gaps, CANDIDATE_CUTS):
            if neutral is None or neutral(text, cut):
                return cut
    return None


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

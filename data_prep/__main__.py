r"""Corpora -> tokenizer + webdataset shards of fixed-length token blocks + manifest.json.

Data prep runs on one machine (all its cores); every training node then reads the same output
directory, so there is no multi-node form of this command. Examples:

    # quick start: the built-in Wikipedia excerpt (gensim test data), a fresh 8k byte-level BPE
    python -m data_prep --input builtin:wiki --train-tokenizer --vocab-size 8192 \
        --block-len 2048 --patch-size 4 --output data/wiki
    # same through the project entry point
    bash run.sh prep --input builtin:wiki --train-tokenizer --vocab-size 8192 --output data/wiki

    # your own files (.jsonl, .jsonl.gz, .json, .txt, .parquet or directories of them) and an
    # existing Hugging Face tokenizer directory; JSON records keep their text under "content"
    python -m data_prep --input corpus/ extra.jsonl.gz --text-field content \
        --tokenizer /models/llama3-tokenizer --block-len 2048 --output data/mine

    # a Hugging Face dataset (hub name, save_to_disk directory or local clone of the hub repository), streamed
    python -m data_prep --input HuggingFaceFW/fineweb-edu --hf-config sample-10BT --streaming \
        --tokenizer gpt2 --output data/fineweb

Output: OUTPUT/tokenizer/ (HF format, EOS after every document, a pad token), OUTPUT/train/ and
OUTPUT/validation/ (webdataset tars, one KEY.npy block of --block-len token ids per sample, uint16
when the vocabulary fits, else uint32) and OUTPUT/manifest.json (tokenizer name/size/hash, block
length, dtype, per-shard counts and sha256, sources with sizes and checksums, bad-input counts, the
command). Bad input is skipped with a message naming file and line and counted (--fail-fast stops).
A rerun with the same arguments after an interruption reuses the finished shards. Read the result
with `pretrain.data.ShardLoader`.

Fine-tuning data (--finetune): JSONL prompt/response or chat records, one block per record with a
loss mask, the prompt left-padded to a multiple of K; see data_prep/finetune.py:

    python -m data_prep --finetune --input data/toy_sft.jsonl --tokenizer runs/quickstart/data \
        --block-len 64 --patch-size 4 --val-fraction 0.05 --output data/toy_sft
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_prep.finetune import FinetuneOptions
from data_prep.manifest import ManifestError
from data_prep.pipeline import PrepConfig, run
from data_prep.records import RecordOptions
from data_prep.sources import DataError, SourceOptions
from data_prep.tokenizer import TokenizerError


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag, and the examples of the module docstring kept as written."""


def parse_args(argv: list[str]) -> PrepConfig:
    p = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Tokenize corpora into webdataset shards of fixed-length blocks (train/validation split "
                    "by document) with a manifest.json and the tokenizer in HF format.",
        epilog=__doc__[__doc__.index("Examples:"):],
        formatter_class=_Formatter)
    io = p.add_argument_group("inputs and output")
    io.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_DATASET",
                    help="files (.jsonl[.gz], .json[.gz], .txt[.gz], .parquet), directories of them, "
                         "Hugging Face dataset names, save_to_disk directories or local clones of hub "
                         "dataset repositories, or builtin:wiki")
    io.add_argument("--output", required=True, type=Path, help="output directory")
    io.add_argument("--text-field", default="text", help="key (JSON) or column (Parquet, datasets) holding the text")
    io.add_argument("--txt-mode", choices=("file", "paragraph"), default="file",
                    help=".txt files: one document per file, or one per blank-line-separated paragraph")
    io.add_argument("--hf-split", default="train", help="split of a Hugging Face dataset")
    io.add_argument("--hf-config", default=None, help="configuration name of a Hugging Face dataset")
    io.add_argument("--streaming", action="store_true", help="stream a hub dataset instead of downloading it")
    io.add_argument("--max-docs", type=int, default=None, help="stop after this many documents (for trials)")
    tk = p.add_argument_group("tokenizer (one of)")
    tk.add_argument("--tokenizer", metavar="NAME_OR_DIR", help="an existing HF (fast) tokenizer")
    tk.add_argument("--train-tokenizer", action="store_true",
                    help="train a byte-level BPE on the train split of the inputs")
    tk.add_argument("--vocab-size", type=int, default=32000, help="vocabulary size for --train-tokenizer")
    sh = p.add_argument_group("shards")
    sh.add_argument("--block-len", type=int, default=2048, help="tokens per sample; a multiple of --patch-size")
    sh.add_argument("--patch-size", "-K", type=int, default=4, help="CALM patch size K the blocks must divide into")
    sh.add_argument("--val-fraction", type=float, default=0.005, help="fraction of documents for validation")
    sh.add_argument("--seed", type=int, default=0, help="seed of the document-level train/validation split")
    sh.add_argument("--shard-mb", type=float, default=32.0,
                    help="MB of input text per work chunk (one train and one validation shard each)")
    ft = p.add_argument_group("fine-tuning data (prompt/response records with loss masks; data_prep/finetune.py)")
    ft.add_argument("--finetune", action="store_true",
                    help="JSONL prompt/response or chat records -> one left-aligned block per record with a loss "
                         "mask (needs --tokenizer, the pretrained model's)")
    ft.add_argument("--prompt-field", default="prompt", help="key of the prompt text")
    ft.add_argument("--response-field", default="response", help="key of the response text (scored)")
    ft.add_argument("--messages-field", default="messages",
                    help="key of a chat [{role, content}, ...]; each assistant turn is scored once")
    ft.add_argument("--truncate", action="store_true",
                    help="cut a record longer than --block-len at the block's end instead of skipping it")
    ft.add_argument("--pack", action="store_true",
                    help="several records per block, in order, each aligned to K and attending only to itself "
                         "(a third sample row holds position ids that restart at every record)")
    run_ = p.add_argument_group("run")
    run_.add_argument("--workers", type=int, default=0, help="worker processes (0: all cores)")
    run_.add_argument("--fail-fast", action="store_true", help="stop at the first bad input instead of skipping it")
    run_.add_argument("--overwrite", action="store_true", help="delete earlier output in --output first")
    run_.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if not a.finetune and (a.pack or a.truncate):
        p.error("--pack and --truncate apply to fine-tuning records: add --finetune")
    return PrepConfig(
        inputs=a.input, output=a.output, tokenizer=a.tokenizer, train_tokenizer=a.train_tokenizer,
        vocab_size=a.vocab_size, block_len=a.block_len, patch_size=a.patch_size, val_fraction=a.val_fraction,
        seed=a.seed, shard_mb=a.shard_mb, max_docs=a.max_docs, workers=a.workers, fail_fast=a.fail_fast,
        overwrite=a.overwrite, progress=not a.no_progress,
        finetune=FinetuneOptions(RecordOptions(a.prompt_field, a.response_field, a.messages_field), a.truncate,
                                 a.pack)
        if a.finetune else None,
        source=SourceOptions(text_field=a.text_field, txt_mode=a.txt_mode, hf_split=a.hf_split,
                             hf_config=a.hf_config, streaming=a.streaming))


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    return run(parse_args(argv), argv)


if __name__ == "__main__":
    try:
        main()
    except (DataError, TokenizerError, ManifestError) as e:
        print(f"[data_prep] error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\n[data_prep] interrupted (Ctrl-C); finished shards are kept: run the same command again to resume",
              file=sys.stderr)
        sys.exit(130)

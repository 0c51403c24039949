"""Fine-tuning data prep: records and chats -> one left-aligned, loss-masked block per record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep.__main__ import main
from data_prep.finetune import build_segment, left_pad, one_block, pack_segments
from data_prep.sources import DataError
from data_prep.toy_tasks import lines
from pretrain.data import MaskedBatch, ShardLoader
from pretrain.models.generation import left_pad as generation_left_pad

REPO = Path(__file__).resolve().parents[2]
K, BLOCK = 4, 48


def _prep(tiny_data_dir, tmp_path, records, *extra, name="out", tokenizer=None) -> Path:
    src = tmp_path / f"{name}.jsonl"
    src.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    out = tmp_path / name
    main(["--finetune", "--input", str(src), "--tokenizer", str(tokenizer or tiny_data_dir), "--block-len",
          str(BLOCK), "--patch-size", str(K), "--val-fraction", "0", "--no-progress", "--output", str(out), *extra])
    return out


def _blocks(data_dir) -> MaskedBatch:
    """Every train block, in order."""
    batches = list(ShardLoader(data_dir, "train", 1, shuffle=False, epochs=1, drop_last=False))
    return MaskedBatch(torch.cat([b.input_ids for b in batches]), torch.cat([b.loss_mask for b in batches]))


def _tokenizer(data_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(data_dir) / "tokenizer"))


def test_alignment_rule_is_shared_with_generation():
    for k in (1, 2, 3, 4, 8):
        for n in range(20):
            ids = list(range(100, 100 + n))
            assert left_pad(ids, k, 7) == generation_left_pad(ids, k, 7)
            assert len(left_pad(ids, k, 7)) % k == 0 and left_pad(ids, k, 7)[len(left_pad(ids, k, 7)) - n:] == ids


def build_block(prompt, response, eos, pad, k, block_len, truncate):
    """One record's own block as data_prep writes it (ids, mask, truncated), or the reason it has none."""
    segment = build_segment(prompt, response, eos, pad, k, block_len, truncate)
    if isinstance(segment, str):
        return segment
    ids, mask = one_block(segment[:2], block_len, pad)
    return ids, mask, segment[2]


def test_block_layout_response_on_a_chunk_boundary_padding_only_in_the_prompt():
    for n_prompt in range(9):
        ids, mask, cut = build_block(list(range(10, 10 + n_prompt)), [50, 51, 52], eos=0, pad=1, k=K, block_len=24,
                                     truncate=False)
        start = int(mask.argmax())
        assert start % K == 0 and not cut
        assert ids[start - n_prompt - 1] == 0 and set(ids[: start - n_prompt - 1].tolist()) <= {1}  # pads, EOS, prompt
        assert ids[start:start + 4].tolist() == [50, 51, 52, 0] and mask.tolist() == [0] * start + [1] * 4 + [0] * (
            24 - start - 4)
        assert set(ids[start + 4:].tolist()) <= {1}
    assert "exceed the block" in build_block([5] * 10, [6] * 20, 0, 1, K, 24, truncate=False)
    ids, mask, cut = build_block([5] * 10, [6] * 20, 0, 1, K, 24, truncate=True)
    assert cut and mask.sum() == 12 and ids[-1] == 6
    assert "no room for a response" in build_block([5] * 23, [6], 0, 1, K, 24, truncate=True)


def test_packing_keeps_order_rounds_records_to_k_and_restarts_positions():
    segments = [([5] * 5, [0, 0, 0, 1, 1]), ([6] * 8, [0] * 4 + [1] * 4), ([7] * 3, [0, 1, 1])]
    first, second = pack_segments(segments, block_len=16, k=K, pad=1)  # widths 8, 8, 4: the third opens a block
    assert first[0].tolist() == [5] * 5 + [1] * 3 + [6] * 8
    assert first[1].tolist() == [0, 0, 0, 1, 1, 0, 0, 0] + [0] * 4 + [1] * 4
    assert first[2].tolist() == list(range(8)) * 2
    assert second[0].tolist() == [7] * 3 + [1] * 13 and second[1].sum() == 2
    assert second[2].tolist() == list(range(4)) + list(range(12))  # the filler is a segment of its own


def test_prompt_response_and_chat_records_become_masked_blocks(tiny_data_dir, tmp_path):
    records = [{"prompt": "Hello there. ", "response": "General Kenobi"},
               {"q": "Question?", "a": "Answer."},
               {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hey"}, {"role": "user", "content": "Bye"},
                             {"role": "assistant", "content": "Ciao"}]}]
    out = _prep(tiny_data_dir, tmp_path, records[:1] + records[2:])
    tok = _tokenizer(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["loss_mask"] is True and manifest["finetune"]["alignment"] == "left_pad"
    assert manifest["tokenizer"]["sha256"] == json.loads((tiny_data_dir / "manifest.json").read_text())["tokenizer"]["sha256"]
    blocks = _blocks(out)
    decoded = [(tok.decode(ids), tok.decode(ids[mask])) for ids, mask in zip(blocks.input_ids, blocks.loss_mask)]
    eos = tok.eos_token
    assert decoded[0][1] == f"General Kenobi{eos}" and f"{eos}Hello there. General Kenobi{eos}" in decoded[0][0]
    # each assistant turn once, with the conversation before it as prompt (plain template)
    assert decoded[1][1] == f"Hey{eos}" and f"{eos}system: Be brief.\nuser: Hi\nassistant: Hey{eos}" in decoded[1][0]
    assert decoded[2][1] == f"Ciao{eos}" and "user: Hi\nassistant: Hey\nuser: Bye\nassistant: Ciao" in decoded[2][0]
    for mask in blocks.loss_mask:
        assert int(mask.int().argmax()) % K == 0
    # configurable field names
    other = _prep(tiny_data_dir, tmp_path, records[1:2], "--prompt-field", "q", "--response-field", "a", name="qa")
    ids, mask = _blocks(other).input_ids[0], _blocks(other).loss_mask[0]
    assert tok.decode(ids[mask]) == f"Answer.{eos}"


def test_the_tokenizers_chat_template_renders_chats(tiny_data_dir, tmp_path):
    tok = _tokenizer(tiny_data_dir)
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok.save_pretrained(tmp_path / "chat_tok")
    out = _prep(tiny_data_dir, tmp_path, [{"messages": [{"role": "user", "content": "Hi"},
                                                         {"role": "assistant", "content": "Yo"}]}],
                tokenizer=tmp_path / "chat_tok")
    blocks = _blocks(out)
    ids, mask = blocks.input_ids[0], blocks.loss_mask[0]
    assert tok.decode(ids[mask]) == f"Yo</s>{tok.eos_token}" and "<user>Hi</s><assistant>Yo</s>" in tok.decode(ids)


BAD = [
    ('{"prompt": "a", "response": ', "malformed_json", "malformed JSON"),
    ('{"prompt": "a"}', "missing_field", "needs 'prompt' and 'response'"),
    ('{"prompt": 3, "response": "b"}', "missing_field", "field 'prompt' is int, not a string"),
    ('{"prompt": "a", "response": ""}', "empty_response", "is empty"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "bad_messages", "no 'assistant' turn"),
    ('{"messages": [{"role": "user"}]}', "bad_messages", "string 'role' and 'content'"),
    (json.dumps({"prompt": "q", "response": " ".join(map(str, range(60)))}), "too_long", "exceed the block"),
]


def test_bad_records_are_reported_with_file_and_line_and_counted(tiny_data_dir, tmp_path, capsys):
    good = json.dumps({"prompt": "p", "response": "r"})
    out = _prep(tiny_data_dir, tmp_path, [good, *(line for line, _, _ in BAD)])
    manifest = json.loads((out / "manifest.json").read_text())
    err = capsys.readouterr().err
    for lineno, (_, kind, message) in enumerate(BAD, start=2):
        assert manifest["bad_input"]["counts"][kind] >= 1
        assert f"out.jsonl:{lineno}: " in err and message in err, (kind, err)
    assert manifest["splits"]["train"]["samples"] == 1
    for line, kind, message in BAD:
        with pytest.raises(DataError, match=f"bad.jsonl:2: .*{message}"):
            _prep(tiny_data_dir, tmp_path, [good, line], "--fail-fast", "--overwrite", name="bad")


def test_cli_errors_are_one_line_and_shards_are_deterministic(tiny_data_dir, tmp_path):
    src = tmp_path / "toy.jsonl"
    src.write_text("\n".join(lines(40, 0)) + "\n")
    assert lines(40, 0) == lines(40, 0) and lines(40, 0) != lines(40, 1)
    base = [sys.executable, "-m", "data_prep", "--finetune", "--input", str(src), "--block-len", "64", "--no-progress"]
    proc = subprocess.run([*base, "--train-tokenizer", "--output", str(tmp_path / "x")], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "needs --tokenizer" in proc.stderr
    shas = []
    for name in ("a", "b"):
        main(["--finetune", "--input", str(src), "--tokenizer", str(tiny_data_dir), "--block-len", "64",
              "--val-fraction", "0.2", "--no-progress", "--output", str(tmp_path / name)])
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        shas.append([s["sha256"] for split in manifest["splits"].values() for s in split["shards"]])
        assert manifest["splits"]["validation"]["samples"] > 0
    assert shas[0] == shas[1]


def test_readme_toy_set_and_prep_commands(tiny_data_dir, tmp_path):
    """The README's two fine-tuning data commands, pointed at temporary paths and the tiny tokenizer."""
    from data_prep.toy_tasks import main as toy_main
    from tests.readme import command

    def swap(words: list[str], values: dict[str, str]) -> list[str]:
        return [values.get(words[i - 1], w) if i else w for i, w in enumerate(words)]

    toy = command("python -m data_prep.toy_tasks")[3:]
    toy_main(swap(toy, {"--output": str(tmp_path / "toy.jsonl")}) + ["--records", "60"])
    for prefix, name in (("python -m data_prep --finetune --input", "toy_sft"),
                         ("python -m data_prep --finetune --pack", "toy_sft_packed")):
        prep = command(prefix)[3:]
        main(swap(prep, {"--input": str(tmp_path / "toy.jsonl"), "--tokenizer": str(tiny_data_dir),
                         "--output": str(tmp_path / name)}) + ["--no-progress"])
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert manifest["loss_mask"] and manifest["bad_input"]["total"] == 0
        assert sum(s["documents"] for s in manifest["splits"].values()) == 60
    blocks = sum(s["samples"] for s in manifest["splits"].values())
    assert manifest["finetune"]["packed"] and blocks < 20

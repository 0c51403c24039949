"""Packed fine-tuning blocks (data_prep --finetune --pack): the same records in fewer blocks, and every
record scored exactly as it is alone in its own block, by the baseline and by CALM."""

from __future__ import annotations

import pytest
import torch
import yaml

from data_prep.__main__ import main as data_prep
from data_prep.toy_tasks import lines
from evaluation.answer_match import records
from pretrain.data import MaskedBatch, ShardLoader
from pretrain.mixture import MixtureLoader
from pretrain.stages import build_model, get_stage
from tests.pretrain.test_finetune import BASELINE, K, REPO, _calm, _train


@pytest.fixture(scope="module")
def sets(tiny_data_dir, tmp_path_factory):
    """{"unpacked": dir, "packed": dir}: the same 200 toy records (blocks of 64, K = 4)."""
    out = tmp_path_factory.mktemp("sft_pack")
    (out / "toy.jsonl").write_text("\n".join(lines(200, 0)) + "\n")
    dirs = {}
    for name, flags in (("unpacked", []), ("packed", ["--pack"])):
        dirs[name] = out / name
        data_prep(["--finetune", "--input", str(out / "toy.jsonl"), "--tokenizer", str(tiny_data_dir), "--block-len",
                   "64", "--patch-size", str(K), "--val-fraction", "0.1", "--no-progress", "--output", str(dirs[name]),
                   *flags])
    return dirs


def _all(data_dir, split="validation") -> MaskedBatch:
    """The whole split as one batch."""
    loader = ShardLoader(data_dir, split, 1, shuffle=False, epochs=1, drop_last=False)
    return next(iter(ShardLoader(data_dir, split, loader.num_samples, shuffle=False, epochs=1, drop_last=False)))


def test_packed_blocks_hold_the_same_records_each_on_chunk_boundaries(sets):
    unpacked, packed = _all(sets["unpacked"]), _all(sets["packed"])
    assert unpacked.position_ids is None and packed.position_ids is not None
    assert len(packed) < 0.6 * len(unpacked)  # toy records are short: two or more per block
    for split in ("train", "validation"):
        assert records(str(sets["packed"]), split, 10**6) == records(str(sets["unpacked"]), split, 10**6)
    starts = packed.position_ids == 0
    assert starts[:, 0].all()
    assert (starts.nonzero()[:, 1] % K == 0).all()  # every record (and the filler) starts a chunk
    # the scored tokens are the same, in the same order
    assert torch.equal(packed.input_ids[packed.loss_mask], unpacked.input_ids[unpacked.loss_mask])


@pytest.fixture(params=["rows", "one_row"])
def layout(request, monkeypatch):
    """"one_row": the whole batch goes in as one row, as under flash-attention (which finds packed
    records only in a batch of one row); here SDPA runs it, so the result must not change."""
    if request.param == "one_row":
        import pretrain.models.calm
        import pretrain.stages

        for module in (pretrain.stages, pretrain.models.calm):
            monkeypatch.setattr(module, "packs_in_one_row", lambda config: True)
    return request.param


def test_baseline_scores_a_packed_record_as_if_it_were_alone(sets, layout):
    """The mean response-only cross-entropy over a split is the same packed or unpacked (every scored
    token sees only its own record), and differs when the position ids are dropped."""
    torch.manual_seed(0)
    model = build_model("baseline", BASELINE)
    objective = get_stage("baseline").objective
    unpacked, packed = _all(sets["unpacked"]), _all(sets["packed"])
    with torch.no_grad():
        alone = objective(model, unpacked).loss
        for rows in (0, 16):  # transformers' own loss and the chunked one
            torch.testing.assert_close(objective(model, packed, ce_chunk_rows=rows).loss, alone, rtol=1e-5, atol=1e-6)
        leaky = objective(model, MaskedBatch(packed.input_ids, packed.loss_mask)).loss
    assert abs(leaky - alone) > 1e-4  # a random model uses its context little, yet far above the tolerance


def test_calm_predicts_a_packed_record_from_that_record_only(sets, layout):
    """The backbone's hidden state before every scored chunk is the same packed or unpacked."""
    model = _calm()
    unpacked, packed = _all(sets["unpacked"]), _all(sets["packed"])

    def before_scored(batch: MaskedBatch, position_ids) -> torch.Tensor:
        with torch.no_grad():
            out = model(input_ids=batch.input_ids, loss_mask=batch.loss_mask, position_ids=position_ids)
        scored = batch.loss_mask[:, K:].reshape(len(batch), -1, K).any(-1)
        return out.last_hidden_state[scored]

    alone = before_scored(unpacked, None)
    torch.testing.assert_close(before_scored(packed, packed.position_ids), alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before_scored(packed, None), alone, atol=1e-3)
    shifted = packed.position_ids.roll(1, dims=1)  # record starts off the chunk grid
    with pytest.raises(ValueError, match="chunk boundaries"):
        model(input_ids=packed.input_ids, loss_mask=packed.loss_mask, position_ids=shifted)


def test_a_packed_set_mixes_with_an_unpacked_one(sets):
    """Rows from the unpacked set get plain positions 0..L-1, so one batch holds both kinds."""
    mixed = MixtureLoader([(str(sets["packed"]), 1.0), (str(sets["unpacked"]), 1.0)],
                          "train", 32, seed=0)
    batch = next(iter(mixed))
    plain = (batch.position_ids == torch.arange(64)).all(1)
    assert plain.any() and (~plain).any()
    assert (batch.position_ids[~plain] == 0).sum(1).ge(2).all()  # the packed rows restart


def test_pack_needs_finetune(tmp_path, capsys):
    with pytest.raises(SystemExit):
        data_prep(["--input", str(tmp_path / "x.jsonl"), "--output", str(tmp_path / "o"), "--pack"])
    assert "--finetune" in capsys.readouterr().err


@pytest.mark.slow
def test_calm_trains_on_packed_shards_through_the_trainer(sets, tmp_path):
    """The real trainer (DeepSpeed engine, validation) trains CALM on packed blocks (the isolation itself
    is checked above, on the objectives the trainer calls)."""
    torch.manual_seed(0)
    build_model("autoencoder", yaml.safe_load((REPO / "configs" / "ae-tiny.yaml").read_text())["model"]) \
        .save_pretrained(tmp_path / "ae")
    records = _train("calm", "calm-tiny", sets["packed"], tmp_path / "calm", f"ae_path={tmp_path / 'ae'}")
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "validation"]
    assert len(train) == 2 and all(r["loss"] == r["loss"] for r in train) and val and val[-1]["loss"] > 0

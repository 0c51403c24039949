"""Exports that leave the pipeline: loaded by plain transformers (remote code) in a Python that cannot
import this repository, generating exactly what the project generates; special tokens from the
tokenizer; the authors' released layout converted; model card; Hub upload errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.data import load_tokenizer
from pretrain.distributed import free_port
from pretrain.export import main as export_main
from pretrain.export import save_export
from pretrain.models.generation import calm_generate
from pretrain.stages import build_model
from tests.pretrain.authors_layout import save_in_authors_layout

PROMPT = "The history of the city"

PREVIOUS_TRANSFORMERS = "5.22.2"
"""The minor release before the pinned one: exports must load there too."""

ISOLATED = r'''
import json, os, sys
from pathlib import Path
if os.environ.get("TRANSFORMERS_SITE"):  # another transformers release, installed on its own
    sys.path.insert(0, os.environ["TRANSFORMERS_SITE"])
for name in ("pretrain", "evaluation", "data_prep"):
    try:
        __import__(name)
    except ModuleNotFoundError:
        continue
    raise SystemExit(f"{name} is importable: the test would not show a self-contained export")
import torch
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, TextStreamer,
                          pipeline)
import transformers
root, task = Path(sys.argv[1]), sys.argv[2]
report = {"transformers": transformers.__version__}
if task == "remote":
    ae = AutoModel.from_pretrained(root / "ae", trust_remote_code=True)
    report["ae_class"] = type(ae).__name__
    report["calm_config"] = type(AutoConfig.from_pretrained(root / "calm", trust_remote_code=True)).__name__
    report["calm_model"] = type(AutoModel.from_pretrained(root / "calm", trust_remote_code=True)).__name__
    generate = pipeline("text-generation", model=str(root / "calm"), trust_remote_code=True)
    report["pipeline"] = {t: generate(sys.argv[3], max_new_tokens=24, temperature=float(t), seed=7,
                                      return_tensors=True)[0]["generated_token_ids"] for t in ("1.0", "0.5")}
    model = AutoModelForCausalLM.from_pretrained(root / "calm", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(root / "calm", trust_remote_code=True)
    ids = tokenizer(sys.argv[3], return_tensors="pt")
    model.generate(**ids, max_new_tokens=8, streamer=TextStreamer(tokenizer), seed=1)
elif task == "baseline":
    model = AutoModelForCausalLM.from_pretrained(root)
    tokenizer = AutoTokenizer.from_pretrained(root)
    ids = tokenizer(sys.argv[3], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=10)
    report["new"] = out[0, ids["input_ids"].shape[1]:].tolist()
    report["eos"] = tokenizer.eos_token_id
elif task == "authors":
    model = AutoModelForCausalLM.from_pretrained(root, trust_remote_code=True).eval()
    ids = torch.tensor(json.loads(sys.argv[3]))
    torch.manual_seed(3)
    report["loss"] = model(input_ids=ids).loss.item()
    report["generated"] = model.generate(ids[:1, :8], max_new_tokens=12, temperature=0.5, seed=5).tolist()
print("REPORT " + json.dumps(report))
'''


def run_isolated(tmp_path: Path, *args: str, site: Path | None = None) -> dict:
    """Run the loader script with `python -I` (no PYTHONPATH, no script or working directory on sys.path)
    from an empty directory, offline; `site` puts another transformers release first on its path."""
    script = tmp_path / "isolated.py"
    script.write_text(ISOLATED)
    work = tmp_path / "elsewhere"
    work.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1",
               TRANSFORMERS_SITE=str(site or ""))
    proc = subprocess.run([sys.executable, "-I", str(script), *args], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("REPORT "))
    return {"report": json.loads(line[len("REPORT "):]), "stdout": proc.stdout}


def _quickstart_sized(vocab: int):
    """The quick start's autoencoder and CALM presets (random weights), the CALM holding the autoencoder."""
    ae_kwargs = dict(load_config("ae-tiny").model, vocab_size=vocab)
    torch.manual_seed(0)
    ae = build_model("autoencoder", ae_kwargs)
    calm = build_model("calm", dict(load_config("calm-tiny").model, vocab_size=vocab, ae_config=ae_kwargs))
    calm.ae_model.load_state_dict(ae.state_dict())
    return ae.eval(), calm.eval()


@pytest.fixture(scope="session")
def previous_transformers(tmp_path_factory) -> Path:
    """transformers PREVIOUS_TRANSFORMERS alone (no dependencies: the pinned ones serve), from PyPI."""
    site = tmp_path_factory.mktemp("transformers_prev")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                           f"transformers=={PREVIOUS_TRANSFORMERS}"], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"cannot install transformers {PREVIOUS_TRANSFORMERS} from the package index: "
                    f"{proc.stderr.strip().splitlines()[-1:]}")
    return site


@pytest.mark.slow
@pytest.mark.parametrize("release", ["pinned", "previous"])
def test_remote_code_exports_load_and_generate_without_the_project(tiny_data_dir, tmp_path, release, request):
    tokenizer = load_tokenizer(tiny_data_dir)
    ae, calm = _quickstart_sized(len(tokenizer))
    exports = tmp_path / "exports"
    save_export(ae, "autoencoder", tokenizer, exports / "ae", {"stage": "autoencoder"}, None, None)
    save_export(calm, "calm", tokenizer, exports / "calm", {"stage": "calm"}, None, None)
    copied = tmp_path / "copied"
    shutil.copytree(exports, copied)  # nothing may point back at where it was written
    ids = tokenizer(PROMPT)["input_ids"]
    expected = {}
    for t in ("1.0", "0.5"):
        out = calm_generate(calm, [ids], 24, float(t), seed=7, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
        expected[t] = ids + out.sequences[0].tolist()
    site = request.getfixturevalue("previous_transformers") if release == "previous" else None
    result = run_isolated(tmp_path, str(copied), "remote", PROMPT, site=site)
    report = result["report"]
    import transformers

    assert report["transformers"] == (PREVIOUS_TRANSFORMERS if site else transformers.__version__)
    assert (report["ae_class"], report["calm_config"], report["calm_model"]) == ("Autoencoder", "CALMConfig", "CALM")
    assert report["pipeline"] == expected
    assert PROMPT in result["stdout"]  # TextStreamer printed the prompt and what followed
    config = json.loads((copied / "calm" / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "calm.CALMConfig", "AutoModel": "calm.CALM",
                                  "AutoModelForCausalLM": "calm.CALM"}
    assert config["ae_path"] is None and config["ae_config"]["latent_size"] == calm.config.latent_size
    assert not list(copied.rglob("*.bin")) and (copied / "calm" / "model.safetensors").is_file()


def _special_tokens(directory: Path) -> dict:
    tokenizer = json.loads((directory / "tokenizer_config.json").read_text())
    return {"config": json.loads((directory / "config.json").read_text()),
            "generation": json.loads((directory / "generation_config.json").read_text())
            if (directory / "generation_config.json").is_file() else None, "tokenizer": tokenizer}


def test_special_tokens_come_from_the_tokenizer_and_plain_llama_stops_at_eos(tiny_data_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_data_dir)
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
           "bos_token_id": tokenizer.bos_token_id}
    assert ids["eos_token_id"] not in (None, 2)  # not Llama's default EOS (id 2 is an ordinary token here)
    baseline = build_model("baseline", dict(load_config("baseline-tiny").model, vocab_size=len(tokenizer)))
    # A model that always puts EOS next: every embedding the same positive vector, the layers silenced,
    # and only the EOS row of the output matrix aligned with it.
    with torch.no_grad():
        baseline.model.embed_tokens.weight.fill_(1.0)
        for layer in baseline.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        baseline.lm_head.weight.zero_()
        baseline.lm_head.weight[ids["eos_token_id"]] = 1.0
    ae, calm = _quickstart_sized(len(tokenizer))
    for stage, model in (("baseline", baseline), ("autoencoder", ae), ("calm", calm)):
        out = save_export(model, stage, tokenizer, tmp_path / stage, {"stage": stage}, None, None)
        saved = _special_tokens(out)
        for key, value in ids.items():
            assert saved["config"].get(key) == value, (stage, key)
            if stage != "autoencoder":
                assert saved["generation"].get(key) == value, (stage, key)
    report = run_isolated(tmp_path, str(tmp_path / "baseline"), "baseline", PROMPT)["report"]
    assert report["eos"] == ids["eos_token_id"] and report["new"] == [ids["eos_token_id"]]


@pytest.mark.slow
def test_authors_layout_converts_and_loads_through_remote_code(tiny_data_dir, tmp_path):
    from pretrain.models import CALM

    tokenizer = load_tokenizer(tiny_data_dir)
    ae, calm = _quickstart_sized(len(tokenizer))
    authors_ae, authors_calm = tmp_path / "CALM-Autoencoder", tmp_path / "CALM-M"
    ae.save_pretrained(authors_ae, safe_serialization=False)  # their .bin layout, same parameter names
    for stale in authors_ae.glob("*.py"):
        stale.unlink()
    save_in_authors_layout(calm, authors_calm)
    tokenizer.save_pretrained(authors_calm)

    out = tmp_path / "converted"
    assert export_main(["--from-authors", str(authors_calm), "--ae-path", str(authors_ae), "--output", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    reference = CALM.from_pretrained(authors_calm, ae_path=str(authors_ae)).eval()
    ids = torch.tensor(tokenizer([PROMPT * 4])["input_ids"])[:, :24]
    torch.manual_seed(3)
    loss = reference(input_ids=ids).loss.item()
    generated = reference.generate(ids[:1, :8], max_new_tokens=12, temperature=0.5, seed=5,
                                   eos_token_id=tokenizer.eos_token_id,  # the export's special tokens
                                   pad_token_id=tokenizer.pad_token_id).tolist()
    report = run_isolated(tmp_path, str(out), "authors", json.dumps(ids.tolist()))["report"]
    assert report["loss"] == loss and report["generated"] == generated
    assert export_main(["--from-authors", str(authors_ae), "--output", str(tmp_path / "ae_out"),
                        "--tokenizer", str(authors_calm)]) == 0
    assert json.loads((tmp_path / "ae_out" / "config.json").read_text())["auto_map"]["AutoModel"] == "autoencoder.Autoencoder"


def test_model_card_and_hub_upload_errors(tiny_data_dir, tmp_path, monkeypatch, capsys):
    tokenizer = load_tokenizer(tiny_data_dir)
    _, calm = _quickstart_sized(len(tokenizer))
    run_dir = tmp_path / "calm-run"
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "eval" / "validation-ctx256.json").write_text(json.dumps({
        "brierlm": {"brierlm": 1.64, "brierlm_se": 0.05, "brier_n": [0.177, 0.037, 0.0091, 0.0012]},
        "data": {"source": "data/quickstart", "split": "validation", "kind": "shards", "context": 256}}))
    training = {"stage": "calm", "tokens_seen": 4_096_000, "block_len": 256}
    out = save_export(calm, "calm", tokenizer, run_dir / "export", training, None, run_dir)
    card = (out / "README.md").read_text()
    header = card.split("---")[1]
    assert "library_name: transformers" in header and "custom_code" in header and "brierlm" in header
    assert "1.64" in card and "context 256" in card and "4,096,000" in card and "trust_remote_code=True" in card
    assert "training FLOPs" in card and "parameters with the frozen autoencoder" in card

    from pretrain.export import push_to_hub

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no cached login either
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(Exception, match="no Hugging Face token"):
        push_to_hub(out, "org/name", private=True)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_" + "x" * 34)
    # No network here: a closed port on this machine stands for an unreachable Hub.
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(Exception, match=r"could not upload .* to http://127\.0\.0\.1"):
        push_to_hub(out, "org/name", private=False)

"""The README.md (Hub model card) written into every export: metadata, what the model is, how to use it.

The YAML header carries what the Hub indexes (library, pipeline tag, tags, datasets, BrierLM results
from the run's `eval/*.json` with their context and data); the body gives the stage, K, parameters
with and without the autoencoder, training tokens and FLOPs, and the three lines that load and
generate. It is rebuilt on every export, so re-exporting after `python -m evaluation` adds the results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

TITLES = {"calm": "CALM (continuous autoregressive language model)", "baseline": "Transformer baseline (Llama)",
          "autoencoder": "CALM autoencoder (K tokens <-> one latent vector)"}


def _eval_results(run_dir: Path | None) -> list[dict[str, Any]]:
    """BrierLM / reconstruction results of this run (newest per file), as written by `python -m evaluation`."""
    if run_dir is None or not (run_dir / "eval").is_dir():
        return []
    results = []
    for path in sorted((run_dir / "eval").glob("*.json")):
        try:
            results.append(json.loads(path.read_text()))
        except json.JSONDecodeError:
            continue
    return results


def _datasets(manifest: dict | None) -> list[str]:
    """Hub dataset ids among the data's sources (inputs given as hf:ORG/NAME)."""
    names = []
    for source in (manifest or {}).get("sources", []):
        text = str(source.get("input", ""))
        if text.startswith("hf:"):
            names.append(text[3:].split(":")[0].split("@")[0])
    return sorted(set(names))


def _model_index(name: str, results: list[dict]) -> list[dict]:
    entries = []
    for r in results:
        if not r.get("brierlm"):
            continue
        data = r.get("data", {})
        entries.append({
            "task": {"type": "text-generation", "name": "Text generation"},
            "dataset": {"name": f"{Path(str(data.get('source', '?'))).name} ({data.get('split') or data.get('kind')})",
                        "type": str(data.get("source", "?"))},
            "metrics": [{"type": "brierlm", "name": f"BrierLM (context {data.get('context')})",
                         "value": round(float(r["brierlm"]["brierlm"]), 4)}],
        })
    return [{"name": name, "results": entries}] if entries else []


def _usage(stage: str) -> str:
    if stage == "autoencoder":
        return ("from transformers import AutoModel\n"
                "ae = AutoModel.from_pretrained(\"REPO\", trust_remote_code=True)\n"
                "mu, log_sigma = ae.encode(input_ids)          # (B, L) -> (B, L/K, latent) each\n"
                "tokens = ae.decode(mu).argmax(-1)             # back to (B, L) token ids")
    remote = ", trust_remote_code=True" if stage == "calm" else ""
    return ("from transformers import pipeline\n"
            f"generate = pipeline(\"text-generation\", model=\"REPO\"{remote})\n"
            "print(generate(\"The history of\", max_new_tokens=64, temperature=0.7)[0][\"generated_text\"])")


def model_card(stage: str, config, name: str, training: dict, counts: dict[str, float],
               manifest: dict | None, run_dir: Path | None) -> str:
    """The README.md text of an export. `counts`: params, params_with_ae, train_flops (may be absent)."""
    results = _eval_results(run_dir)
    meta = {"library_name": "transformers", "tags": ["calm", f"calm-{stage}"] + (["custom_code"] if stage != "baseline" else []),
            "pipeline_tag": "text-generation" if stage != "autoencoder" else None,
            "datasets": _datasets(manifest) or None, "model-index": _model_index(name, results) or None}
    meta = {k: v for k, v in meta.items() if v is not None}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {name}", "",
             f"{TITLES[stage]}, trained with the CALM pretraining pipeline.", ""]
    facts = [("stage", stage), ("vocabulary", config.vocab_size)]
    if stage != "baseline":
        facts.append(("K (tokens per vector)", config.patch_size))
        facts.append(("latent size", config.latent_size))
    facts.append(("parameters", f"{counts['params']:,}"))
    if "params_with_ae" in counts:
        facts.append(("parameters with the frozen autoencoder", f"{counts['params_with_ae']:,}"))
    if training.get("tokens_seen") is not None:
        facts.append(("training tokens", f"{training['tokens_seen']:,}"))
    if counts.get("train_flops"):
        facts.append(("training FLOPs", f"{counts['train_flops']:.3g}"))
    if training.get("block_len"):
        facts.append(("training block length (tokens)", training["block_len"]))
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in facts] + [""]
    if results:
        lines += ["## Evaluation", "", "| data | context | BrierLM | Brier-1..4 |", "|---|---|---|---|"]
        for r in results:
            if r.get("brierlm"):
                b, data = r["brierlm"], r.get("data", {})
                lines.append(f"| {data.get('source')} ({data.get('split') or data.get('kind')}) | {data.get('context')} "
                             f"| {b['brierlm']:.3f} ± {b['brierlm_se']:.3f} | "
                             + " / ".join(f"{v:.4g}" for v in b["brier_n"]) + " |")
        lines.append("")
    lines += ["## Use", "", "```python", _usage(stage).replace("REPO", name), "```", ""]
    if stage == "calm":
        lines += ["CALM samples without likelihoods: `temperature` in (0, 1] is exact, there is no greedy "
                  "decoding, top-k or top-p. `generate()` also takes `seed=`.", ""]
    return "\n".join(lines)

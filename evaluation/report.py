"""Comparison report over several runs: report.md, report.json and PNG plots, readable on GitHub.

    python -m evaluation.report runs/baseline-tiny runs/calm-tiny runs/ae-tiny --out reports/tiny
    bash run.sh report runs/* --out reports/all

Each argument is a run directory (its `eval/*.json` results, `metrics.jsonl` and `export/`), an
export directory (its `eval/*.json`), or one result JSON (schema: `evaluation.results`). Training
FLOPs spent come from the run's `metrics.jsonl` (the last training record's `train_flops`); params
and inference FLOPs per token from the result (`evaluation.flops`). A run without results still gets
its training curves.

Writes into --out:
- `report.md`: one table row per result (params, train FLOPs, inference FLOPs/token, BrierLM ± se,
  Brier-1..4, generation speed when measured, data and context), the AE fidelity table, the plots;
- `report.json`: the same rows and curves as data (`"schema": "calm-report/1"`);
- `frontier_N.png`, one per evaluation set and context (BrierLM vs training FLOPs, one line per model
  family: the baseline, CALM at each K), `brier_n.png` (Brier-1..4 per model, labelled with data and
  context), `training_curves.png` (loss vs tokens and vs FLOPs, one row per stage; the autoencoder's
  cross-entropy on both sides), `ae_robustness.png`.

A result older than the model it scores, or made at a context past the model's positions, is kept
in the table with a note and left out of the plots.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from evaluation.results import read_jsonl, read_result
from pretrain.metrics import autoencoder_run

FAMILY = {"baseline": "Transformer (baseline)", "calm": "CALM"}
STAGE_ORDER = ("baseline", "calm", "autoencoder")


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, one per (split, step): where a file from before resumes
    dropped their repeated steps holds one twice, the later record wins."""
    records = {}
    for lineno, record in read_jsonl(path):
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path}:{lineno}: expected a metrics record with a 'step' key")
        records[record.get("split", "train"), record["step"]] = record
    return list(records.values())


def curves(records: list[dict], key: str = "loss") -> dict:
    """Train and validation `key` against tokens and training FLOPs (the autoencoder's curves use its
    cross-entropy, "ce", on both sides: its training loss adds a weighted KL that validation does not)."""
    train = [r for r in records if r.get("split", "train") == "train" and r.get(key) is not None and "tokens_seen" in r]
    val = [r for r in records if r.get("split") == "validation" and r.get(key) is not None and "tokens_seen" in r]
    with_flops = [r for r in train if r.get("train_flops") and r["tokens_seen"]]
    per_token = with_flops[-1]["train_flops"] / with_flops[-1]["tokens_seen"] if with_flops else None

    def series(rs):
        return {"step": [r["step"] for r in rs], "tokens": [r["tokens_seen"] for r in rs],
                "flops": [r["tokens_seen"] * per_token for r in rs] if per_token else None,
                "loss": [r[key] for r in rs]}

    return {"quantity": key, "train": series(train), "validation": series(val),
            "train_flops": max((r["train_flops"] for r in with_flops), default=None),
            "tokens_seen": max((r["tokens_seen"] for r in train), default=None)}


def collect(inputs: list[str]) -> tuple[list[dict], list[dict]]:
    """(result rows, runs with curves) from run dirs, export dirs and result files."""
    rows, runs, seen = [], [], set()
    for item in inputs:
        path = Path(item)
        if path.is_file():
            results, run_dir = [path], None
        elif path.is_dir():
            run_dir = path if (path / "metrics.jsonl").is_file() else None
            results = sorted(path.glob("eval/*.json")) + sorted(path.glob("export/eval/*.json"))
            if not results and run_dir is None:
                raise FileNotFoundError(f"{path}: no eval/*.json results and no metrics.jsonl")
        else:
            raise FileNotFoundError(f"{path} does not exist")
        for res_path in results:
            result = read_result(res_path)
            rd = run_dir or (Path(result["model"]["run_dir"]) if result["model"].get("run_dir") else None)
            rows.append(_row(result, res_path, rd))
            if rd is not None and (rd / "metrics.jsonl").is_file() and rd.resolve() not in seen:
                seen.add(rd.resolve())
                runs.append(_run(rd, result["model"]["stage"], result["model"]["name"]))
        if run_dir is not None and run_dir.resolve() not in seen:
            seen.add(run_dir.resolve())
            runs.append(_run(run_dir, _stage_of_run(run_dir), run_dir.name))
    return rows, runs


def _stage_of_run(run_dir: Path) -> str | None:
    training = run_dir / "export" / "training.json"
    if training.is_file():
        return json.loads(training.read_text()).get("stage")
    return None


def _run(run_dir: Path, stage: str | None, name: str) -> dict:
    records = read_metrics(run_dir / "metrics.jsonl")
    key = "ce" if stage == "autoencoder" and any("ce" in r for r in records if r.get("split") == "train") else "loss"
    return {"name": name, "stage": stage, "run_dir": str(run_dir), **curves(records, key)}


def _row(result: dict, path: Path, run_dir: Path | None) -> dict:
    model, data = result["model"], result["data"]
    spent = ae_spent = None
    if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
        spent = curves(read_metrics(run_dir / "metrics.jsonl"))["train_flops"]
        ae_run = autoencoder_run(run_dir) if model["stage"] == "calm" else None
        ae_spent = curves(read_metrics(ae_run / "metrics.jsonl"))["train_flops"] if ae_run else None
    gen = result.get("generation") or {}
    return {
        "name": model["name"], "stage": model["stage"], "result": str(path), "params": model["params"],
        "patch_size": model.get("patch_size", 1), "train_flops": spent, "ae_train_flops": ae_spent,
        "inference_flops_per_token": model["inference_flops_per_token"],
        "data": Path(data["source"]).name + (f":{data['split']}" if data.get("split") else ""),
        "context": data["context"], "brierlm": result["brierlm"], "reconstruction": result["reconstruction"],
        "tokens_per_second": gen.get("tokens_per_second"), "flag": _flag(result),
    }


def _flag(result: dict) -> str | None:
    """Why a result should not stand beside the others: older than the model it scores, or scored at a
    context past the model's positions (--allow-long-context). None when it is current. (Results at
    different contexts are not mixed either: each evaluation set and context gets its own frontier.)"""
    from datetime import datetime

    model_file = Path(result["model"]["path"]) / "model.safetensors"
    created = result.get("created")
    if created and model_file.is_file():
        made = datetime.fromisoformat(created).timestamp()
        if made < model_file.stat().st_mtime - 1:
            return "older than the model"
    if result["data"].get("beyond_positions"):
        return f"context {result['data'].get('context')} past the model's positions"
    return None


def family(row: dict) -> str:
    """One line per model family on a frontier: the kind of model and, for CALM, its K."""
    return FAMILY[row["stage"]] + (f" K={row['patch_size']}" if row["stage"] == "calm" else "")


def eval_set(row: dict) -> str:
    return f"{row['data']}, context {row['context']}"


def _num(x: float | None, fmt: str = ".3g") -> str:
    if x is None:
        return "–"
    if abs(x) >= 1e5 or (0 < abs(x) < 1e-3):
        mant, exp = f"{x:.2e}".split("e")
        return f"{mant}e{int(exp)}"
    return str(x) if isinstance(x, int) else format(x, fmt)


def _params(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def plot_all(rows: list[dict], runs: list[dict], out: Path) -> list[str]:
    """Writes the plots the results allow into `out`; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lm_rows = [r for r in rows if r["brierlm"] and not r["flag"]]
    sets = sorted({eval_set(r) for r in lm_rows})
    made = [
        *(_plot_frontier(plt, [r for r in lm_rows if r["train_flops"] and eval_set(r) == name], name,
                         out / f"frontier_{i + 1}.png") for i, name in enumerate(sets)),
        _plot_brier_n(plt, lm_rows, out),
        _plot_training_curves(plt, [r for r in runs if r["train"]["loss"]], out),
        _plot_ae_robustness(plt, [r for r in rows if r["reconstruction"]], out),
    ]
    return [name for name in made if name is not None]


def _plot_frontier(plt, frontier: list[dict], name: str, path: Path) -> str | None:
    """BrierLM against training FLOPs on one evaluation set and context, one line per model family."""
    if not frontier:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, fam in enumerate(sorted({family(r) for r in frontier})):
        pts = sorted(((r["train_flops"], r["brierlm"]["brierlm"], r) for r in frontier if family(r) == fam),
                     key=lambda p: p[0])
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2]["brierlm"]["brierlm_se"] for p in pts],
                    marker="os^vD"[i % 5], label=fam, capsize=3)
        for f, b, r in pts:
            ax.annotate(r["name"], (f, b), textcoords="offset points", xytext=(4, 4), fontsize=8)
    _flops_axis(ax, [r["train_flops"] for r in frontier])
    ax.set_ylim(bottom=0)  # BrierLM is a score from 0: a cropped axis would exaggerate small gaps
    return _save_single(fig, ax, path, "training FLOPs", "BrierLM (± 1 s.e.)", f"BrierLM vs training compute\n{name}")


def _flops_axis(ax, flops: list[float]) -> None:
    """A log axis over a wide range; over a narrow one (compute-matched models) a linear axis with room
    on both sides, ticks in units of 1e<exponent>, so the points do not sit on the frame."""
    low, high = min(flops), max(flops)
    if high > 3 * low:
        ax.set_xscale("log")
        return
    span = max(high - low, 0.05 * high)
    ax.set_xlim(low - 0.6 * span, high + 0.6 * span)
    ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0), useOffset=False)


def _plot_brier_n(plt, lm_rows: list[dict], out: Path) -> str | None:
    """Brier-1..4 as grouped bars, one bar per model."""
    if not lm_rows:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(lm_rows) + 2), 4))
    width = 0.8 / len(lm_rows)
    for i, r in enumerate(lm_rows):
        xs = [n + (i - (len(lm_rows) - 1) / 2) * width for n in range(4)]
        ax.bar(xs, r["brierlm"]["brier_n"], width, yerr=r["brierlm"]["brier_n_se"], capsize=2,
               label=f"{r['name']} ({r['stage']}) · {eval_set(r)}")
    ax.set_xticks(range(4), [f"Brier-{n}" for n in range(1, 5)])
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_title("Brier-n per model")
    ax.legend(fontsize=8)
    return _save(fig, out / "brier_n.png")


def _plot_training_curves(plt, curve_runs: list[dict], out: Path) -> str | None:
    """Loss against tokens (left) and training FLOPs (right), one row of axes per stage."""
    if not curve_runs:
        return None
    stages = [s for s in STAGE_ORDER if any(r["stage"] == s for r in curve_runs)]
    stages += sorted({str(r["stage"]) for r in curve_runs} - set(stages))
    fig, axes = plt.subplots(len(stages), 2, figsize=(10, 3.2 * len(stages)), squeeze=False)
    for row_axes, stage in zip(axes, stages):
        for ax, key, label in ((row_axes[0], "tokens", "tokens"), (row_axes[1], "flops", "training FLOPs")):
            for r in (r for r in curve_runs if str(r["stage"]) == stage):
                if r["train"][key]:
                    line, = ax.plot(r["train"][key], r["train"]["loss"], label=f"{r['name']} train")
                    if r["validation"][key]:
                        ax.plot(r["validation"][key], r["validation"]["loss"], "o--", color=line.get_color(),
                                label=f"{r['name']} validation", markersize=3)
            ax.set_xlabel(label)
            quantity = {str(r["quantity"]) for r in curve_runs if str(r["stage"]) == stage}
            ax.set_ylabel(f"{stage} " + ("cross-entropy" if quantity == {"ce"} else "loss"))
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    fig.suptitle("Training curves")
    return _save(fig, out / "training_curves.png")


def _plot_ae_robustness(plt, ae_rows: list[dict], out: Path) -> str | None:
    """Autoencoder reconstruction accuracy against the noise added to its latent, one line per model."""
    if not ae_rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in ae_rows:
        rob = r["reconstruction"]["robustness"]
        ax.plot([p["noise_std"] for p in rob], [p["accuracy"] for p in rob], "o-", label=r["name"])
    return _save_single(fig, ax, out / "ae_robustness.png", "std of Gaussian noise added to the sampled latent",
                        "token reconstruction accuracy", "Autoencoder robustness")


def _save_single(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> str:
    """Labels a one-axes figure (gridded, with a legend) and saves it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


def markdown(rows: list[dict], runs: list[dict], plots: list[str], with_ae: bool = False) -> str:
    lines = ["# CALM evaluation report", ""]
    lm_rows = [r for r in rows if r["brierlm"]]
    if lm_rows:
        lines += [
            "## Language models", "",
            "| model | stage | K | params | train FLOPs | AE train FLOPs | infer FLOPs/token | BrierLM | Brier-1 "
            "| Brier-2 | Brier-3 | Brier-4 | positions | gen tokens/s | data | context | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in lm_rows:
            b = r["brierlm"]
            briers = " | ".join(f"{v:.4f}" for v in b["brier_n"])
            lines.append(
                f"| {r['name']} | {r['stage']} | {r['patch_size']} | {_params(r['params'])} | {_num(r['train_flops'])} "
                f"| {_num(r.get('ae_train_flops')) if r['stage'] == 'calm' else ''} "
                f"| {_num(r['inference_flops_per_token'])} | {b['brierlm']:.3f} ± {b['brierlm_se']:.3f} | {briers} "
                f"| {b['positions']} | {_num(r['tokens_per_second'])} | {r['data']} | {r['context']} "
                f"| {'left out of the plots: ' + r['flag'] if r['flag'] else ''} |"
            )
        lines += ["", "BrierLM = 100 · geometric mean of Brier-1..4 (floored at 0); ± one standard error "
                      "(positions treated as independent). CALM parameters exclude the frozen autoencoder. "
                      + ("Training FLOPs of CALM rows INCLUDE its autoencoder's own training (AE train FLOPs, "
                         "counted in: --with-ae-flops)" if with_ae else
                         "Training FLOPs are those of the run itself: CALM's autoencoder's own training (AE train "
                         "FLOPs) is listed apart and NOT counted in them or in the frontier plots (--with-ae-flops "
                         "counts it)") + " (docs/method.md §7).", ""]
    ae_rows = [r for r in rows if r["reconstruction"]]
    if ae_rows:
        lines += ["## Autoencoders", "",
                  "| model | params | accuracy (sampled z) | accuracy (z = μ) | tokens | data |", "|---|---|---|---|---|---|"]
        for r in ae_rows:
            rec = r["reconstruction"]
            lines.append(f"| {r['name']} | {_params(r['params'])} | {rec['accuracy']:.5f} | {rec['accuracy_mean']:.5f} "
                         f"| {rec['tokens']} | {r['data']} |")
        lines.append("")
    if runs:
        lines += ["## Runs", "", "| run | stage | tokens seen | train FLOPs | last train loss | last validation loss |",
                  "|---|---|---|---|---|---|"]
        for r in runs:
            train, val = (_num(r[s]["loss"][-1], ".4f") if r[s]["loss"] else "–" for s in ("train", "validation"))
            lines.append(f"| {r['name']} | {r['stage'] or '?'} | {_num(r['tokens_seen'])} | {_num(r['train_flops'])} "
                         f"| {train} | {val} |")
        lines.append("")
    titles = {"brier_n.png": "Brier-n per model", "training_curves.png": "Training curves",
              "ae_robustness.png": "Autoencoder robustness"}
    sets = sorted({eval_set(r) for r in lm_rows if not r["flag"]})
    for name in plots:
        title = titles.get(name) or f"BrierLM vs training FLOPs: {sets[int(name.split('_')[1].split('.')[0]) - 1]}"
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    return "\n".join(lines)


def build_report(inputs: list[str], out: str | Path, with_ae_flops: bool = False) -> dict:
    """`with_ae_flops`: CALM rows are charged their autoencoder's training FLOPs too (table and plots)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, runs = collect(inputs)
    if with_ae_flops:
        for r in rows:
            if r["stage"] == "calm" and r["train_flops"] and r["ae_train_flops"]:
                r["train_flops"] += r["ae_train_flops"]
    plots = plot_all(rows, runs, out)
    report = {"schema": "calm-report/1", "inputs": inputs, "models": rows, "runs": runs, "plots": plots,
              "calm_flops_include_autoencoder": with_ae_flops}
    (out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    (out / "report.md").write_text(markdown(rows, runs, plots, with_ae_flops))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.report", description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="+", help="run directories, export directories or result JSON files")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--with-ae-flops", action="store_true",
                   help="charge CALM its autoencoder's training FLOPs too (default: each run's own FLOPs; the "
                        "autoencoder's are listed apart)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        report = build_report(args.inputs, args.out, args.with_ae_flops)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {len(report['models'])} results, {len(report['runs'])} runs, plots {report['plots']} "
          f"-> {Path(args.out) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

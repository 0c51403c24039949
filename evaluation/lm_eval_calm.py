"""lm-evaluation-harness for CALM: a registered `calm` model that answers generation tasks with CALM.generate.

    python -m evaluation.lm_eval_calm --model_args pretrained=runs/calm-m/export --tasks gsm8k \\
        [--include_path my_tasks/] [--limit 100] [--num_fewshot 5] [--output_path results/]
    lm_eval --model hf --model_args pretrained=runs/transformer-s/export --tasks gsm8k   # the baseline, as is

The baseline export is a plain Llama, so lm-eval's own `hf` model runs it unchanged. A CALM has no
token likelihoods, so only `generate_until` tasks can score it: log-likelihood and perplexity
requests (multiple choice, `loglikelihood_rolling`) are refused with a message saying so. Greedy
decoding does not exist for CALM either; a task that asks for it (`do_sample: false` or temperature 0,
the usual setting) is sampled at `greedy_temperature` (model argument, default 0.5), and a task's own
temperature in (0, 1] is used as given. Generation stops at the task's `until` strings, at EOS or at
`max_gen_toks`. `seed` (model argument, default 0) makes runs repeatable.
"""

from __future__ import annotations

import sys

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

DEFAULT_MAX_GEN_TOKS = 256


@register_model("calm")
class CALMHarness(LM):
    """A CALM export behind lm-eval's LM interface (generate_until only)."""

    def __init__(self, pretrained: str, device: str | None = None, greedy_temperature: float = 0.5,
                 seed: int = 0, batch_size: int | str = 1, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, **_):
        super().__init__()
        from transformers import AutoTokenizer

        from pretrain.stages import load_model

        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval passes cuda by default
        self.device_ = torch.device(device)
        self.model = load_model("calm", pretrained).to(self.device_).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained)
        self.greedy_temperature = float(greedy_temperature)
        if not 0.0 < self.greedy_temperature <= 1.0:
            raise ValueError(f"greedy_temperature must be in (0, 1], got {greedy_temperature}")
        self.seed, self.max_gen_toks = int(seed), int(max_gen_toks)

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "CALM has no token likelihoods, so it cannot answer log-likelihood requests (multiple-choice tasks); "
            "evaluate it on generate_until tasks, and compare likelihood-free with BrierLM (python -m evaluation)")

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError(
            "CALM has no token likelihoods, so it has no perplexity (loglikelihood_rolling); use BrierLM "
            "(python -m evaluation) for a likelihood-free language-modelling score")

    def _temperature(self, gen_kwargs: dict) -> float:
        temperature = gen_kwargs.get("temperature")
        if not gen_kwargs.get("do_sample", False) or not temperature:
            return self.greedy_temperature
        if not 0.0 < float(temperature) <= 1.0:
            raise ValueError(f"CALM samples at temperatures in (0, 1]; the task asks for {temperature}")
        return float(temperature)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        answers = []
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = self.tokenizer(context, return_tensors="pt", add_special_tokens=False)["input_ids"]
            eos = self.tokenizer.eos_token_id
            if eos is not None:  # every prompt starts a document, as in training
                ids = torch.cat([torch.tensor([[eos]]), ids], dim=1)
            out = self.model.generate(ids.to(self.device_), max_new_tokens=int(gen_kwargs.get("max_gen_toks",
                                                                                                self.max_gen_toks)),
                                      temperature=self._temperature(gen_kwargs), seed=self.seed + i,
                                      return_dict_in_generate=True)
            new = out.new_tokens[0, : int(out.lengths[0])].tolist()
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            answers.append(text)
        return answers


def main(argv: list[str] | None = None) -> int:
    """lm-eval's own command line, with the `calm` model registered (and selected unless --model is given)."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--model" not in argv:
        argv = ["--model", "calm", *argv]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""BrierLM estimators (docs/method.md §5): a likelihood-free score for the baseline and for CALM.

Here, below evaluation, because training scores a validation subsample with them as it goes
(`pretrain.train`), and `python -m evaluation` scores whole evaluation sets with the same code.
"""

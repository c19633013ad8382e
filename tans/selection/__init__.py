"""The selection stage: searching the zoo for a dataset, fine-tuning the picks, and benchmarking selectors.

(Named ``selection``, not ``search``: ``search`` is the job, :func:`jobs.api.search` its Python API.)

- ``search``: the ideas of a search without Ray (datasets, candidate pools, baseline picks, the report).
- ``finetune``: fine-tuning a retrieved candidate on a new dataset.
- ``export``: the exported winner of a search and ``tans.load_model``.
- ``logme``: LogME on frozen features.
- ``transferability``: LogME / H-score / N-LEEP / linear-probe scores of frozen features.
- ``evaluation``: the model-selection benchmark (pools, cheap selectors, the report).
- ``metrics``: weighted Kendall tau, top-k regret, bootstrap intervals, summaries.
"""

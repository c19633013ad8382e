"""The space stage: TANS's cross-modal space of queries and models, trained and stored.

- ``features``: frozen feature extractors (supernet / ResNet-18) that turn a dataset into a query.
- ``encoders``: the query encoder, the model encoder and the predictor.
- ``contrastive``: the hard-negative contrastive loss plus the predictor's loss.
- ``training``: the training step, the validation and the model index.
- ``metrics``: validation metrics of a space (R@k, ranks, Kendall tau) and their baselines.
- ``retrieval``: the constraint mask and the masked top-k ``Retriever`` with re-ranking.
- ``store``: a trained space on storage (``spaces/<run>/``, ``spaces/LATEST``).
"""

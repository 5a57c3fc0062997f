"""Models for tests and benchmarks, like ``torch.testing``: tiny random models of every family
(:mod:`.tiny`) and models with planted culture neurons (:mod:`.planted`). Never imported by the
core."""

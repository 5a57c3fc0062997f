"""Models for tests and benchmarks, like ``torch.testing``: tiny random models of every family
(:mod:`.tiny`, built by :mod:`culture_neurons.models.tiny`), models with planted culture
neurons (:mod:`.planted`; what was planted and how selected sets score against it:
:mod:`.truth`) and the peak-memory measure the tests and bench_record share (:mod:`.memory`).
Never imported by the core."""

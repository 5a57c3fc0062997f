"""Backends that instrument a decoder MLP. Each module offers ``attach(instrument) -> handle``
with ``handle.flush()`` (bring accumulators up to date) and ``handle.detach()``."""

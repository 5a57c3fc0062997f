"""The embedded demo: a trained toy VLM and its synthetic culture data (:mod:`.toy`), what
``culture-neurons run`` uses without ``--model``. Never imported by the core."""

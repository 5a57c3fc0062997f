"""All model knowledge: one adapter per family (:mod:`.adapters`) and loading (:mod:`.loading`).

    from culture_neurons import models
    models.get_adapter(model)        # the family's adapter; an error lists the supported ones
    models.decoder_mlps(model)       # the language model's gated MLPs, in layer order
    models.fingerprint(model)        # what identifies its neurons (stats and masks carry it)
"""

from culture_neurons.models.adapters import (
    ADAPTERS,
    SUPPORTED,
    Adapter,
    activation_fn,
    decoder_mlps,
    fingerprint,
    get_adapter,
    image_token_ids,
    logit_softcap,
    mlp_activation,
    text_config,
)

__all__ = [
    "ADAPTERS",
    "SUPPORTED",
    "Adapter",
    "activation_fn",
    "decoder_mlps",
    "fingerprint",
    "get_adapter",
    "image_token_ids",
    "logit_softcap",
    "mlp_activation",
    "text_config",
]

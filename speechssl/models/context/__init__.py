"""Context networks: a registry of modules that map frontend features ``(B, T, D_in)`` and a
padding mask ``(B, T)`` (True = padding) to outputs ``(B, T', D_out)``, the per-layer hidden states
and the output padding mask (:mod:`speechssl.models.context.base`).

Adding one: a new module with a config dataclass (with a ``type`` field, its checks in
``__post_init__``) and a :class:`ContextNetwork` subclass decorated with
``@register_context("name", NameConfig)``, then its name in the import line below. The test suite
runs every registered network (``configs/model/tiny_NAME.yaml`` is its tiny configuration).
"""

# The registry: each import registers its network.
from speechssl.models.context import conformer, transformer, zipformer  # noqa: F401
from speechssl.models.context.base import (
    ContextNetwork,
    ContextOutput,
    build_context,
    context_config_class,
    init_bert_params,
    register_context,
    registered_contexts,
)

__all__ = ["ContextNetwork", "ContextOutput", "build_context", "context_config_class", "init_bert_params",
           "register_context", "registered_contexts"]

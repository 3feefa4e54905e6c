"""The Zipformer context network (``context.type: zipformer``): icefall's Zipformer2 encoder fed
at the feature extractor's 50 Hz. ``network`` holds the stacks and the config, ``layer`` the
Zipformer layer and its modules, ``scaling`` the schedules, BiasNorm, Swoosh activations and the
gradient-only training aids."""

from speechssl.models.context.zipformer.network import Zipformer, ZipformerConfig, stack_states, unstack_states

__all__ = ["Zipformer", "ZipformerConfig", "stack_states", "unstack_states"]

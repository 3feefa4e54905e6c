"""Loads the reference Zipformer (PyPI ``zipformer`` 0.1.3, icefall's Zipformer2) for parity tests.

The package's ``__init__`` imports its training and decoding tools (and their dependencies); the
encoder, scaling and optimizer modules need only torch and two helpers. So the package is
registered without running its ``__init__``, with those helpers, and only those modules are imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import torch


def _import(name: str):
    """``zipformer.modules.<name>`` of the installed reference package."""
    if "zipformer" not in sys.modules:
        spec = importlib.util.find_spec("zipformer")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("the reference package is missing: ./run.sh installs zipformer==0.1.3 (--no-deps)")
        package = types.ModuleType("zipformer")
        package.__path__ = list(spec.submodule_search_locations)
        utils = types.ModuleType("zipformer.utils")
        utils.torch_autocast = lambda device_type="cuda", **kwargs: torch.autocast(device_type=device_type, **kwargs)
        utils.fix_random_seed = torch.manual_seed
        sys.modules["zipformer"], sys.modules["zipformer.utils"] = package, utils
    return importlib.import_module(f"zipformer.modules.{name}")


def reference_module():
    """The reference encoder: ``zipformer.modules.zipformer``."""
    return _import("zipformer")


def reference_scaling():
    """The reference training aids (Balancer, Whiten): ``zipformer.modules.scaling``."""
    return _import("scaling")


def reference_optim():
    """The reference optimizer and schedules: ``zipformer.modules.optim``."""
    return _import("optim")


SIZES = ("downsampling_factor", "encoder_dim", "num_encoder_layers", "encoder_unmasked_dim", "query_head_dim",
         "pos_head_dim", "value_head_dim", "num_heads", "feedforward_dim", "cnn_module_kernel")


def reference_encoder(config, **kwargs):
    """The reference encoder with the sizes of our ``ZipformerConfig`` (output downsampling 2, its
    default); ``kwargs`` go to its constructor."""
    return reference_module().Zipformer(output_downsampling_factor=2, pos_dim=config.pos_dim,
                                        **{k: tuple(getattr(config, k)) for k in SIZES}, **kwargs)

"""Loads the reference Zipformer (PyPI ``zipformer`` 0.1.3, icefall's Zipformer2) for parity tests.

The package's ``__init__`` imports its training and decoding tools (and their dependencies); the
encoder modules need only torch and one helper. So the package is registered without running its
``__init__``, with that helper, and only ``zipformer.modules.zipformer`` is imported.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import torch


def reference_module():
    """``zipformer.modules.zipformer`` of the installed reference package."""
    if "zipformer.modules.zipformer" in sys.modules:
        return sys.modules["zipformer.modules.zipformer"]
    spec = importlib.util.find_spec("zipformer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the reference package is missing: ./run.sh installs zipformer==0.1.3 (--no-deps)")
    package = types.ModuleType("zipformer")
    package.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("zipformer.utils")
    utils.torch_autocast = lambda device_type="cuda", **kwargs: torch.autocast(device_type=device_type, **kwargs)
    sys.modules["zipformer"], sys.modules["zipformer.utils"] = package, utils
    return importlib.import_module("zipformer.modules.zipformer")

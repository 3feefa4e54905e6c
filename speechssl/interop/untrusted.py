"""Reading checkpoints of other toolkits without running their pickled code.

fairseq checkpoints pickle more than tensors: an ``argparse.Namespace`` (``args``), omegaconf
``DictConfig`` trees (``cfg``, in some versions), numpy scalars, enum members. ``torch.load`` with
``weights_only=False`` would import and call whatever the file names, so a hostile file runs code.
:func:`load_untrusted` keeps ``torch.load``'s restricted unpickler and lets each class the file
names be built as an inert stand-in (:class:`Opaque`) that only records its arguments and state;
nothing from the file is imported or called. :func:`plain` then turns the stand-ins that carry
data (``Namespace``, omegaconf containers and nodes, enum members) into dicts, lists and scalars.
"""

from __future__ import annotations

import os
import re
import zipfile
from typing import Any

import torch
from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

_UNSUPPORTED = re.compile(r"GLOBAL (\S+) was not an allowed global")
MAX_NAMES = 200  # a checkpoint naming more classes than this is not a model checkpoint


class Opaque:
    """The stand-in for a class or function named in an untrusted pickle. Calling it (the pickle's
    ``REDUCE``), creating it (``NEWOBJ``) and setting its state (``BUILD``) only record the values:
    ``name`` (the full name in the file), ``args`` and ``state``."""

    name = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.name} from an untrusted file>"


def _stand_in(full_name: str) -> tuple[type, str]:
    return type(full_name.rsplit(".", 1)[-1], (Opaque,), {"name": full_name}), full_name


def load_untrusted(path: str | os.PathLike) -> Any:
    """The object in a ``torch.save`` file (zip or legacy format), its tensors on the CPU, every
    other class it names replaced by an :class:`Opaque` stand-in. Modules that torch blocks
    outright (``os``, ``sys``...) stay refused: ``pickle.UnpicklingError``."""
    names: dict[str, tuple[type, str]] = {}
    if zipfile.is_zipfile(path):
        names = {n: _stand_in(n) for n in get_unsafe_globals_in_checkpoint(path)}
    while True:
        try:
            with safe_globals(list(names.values())):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch wraps the unpickler's error; its message names the global
            found = _UNSUPPORTED.search(str(error))
            if found is None or found.group(1) in names or len(names) >= MAX_NAMES:
                raise
            names[found.group(1)] = _stand_in(found.group(1))


def _omegaconf_value(obj: Opaque) -> Any:
    state = obj.state if isinstance(obj.state, dict) else {}
    name = obj.name.rsplit(".", 1)[-1]
    if name == "DictConfig":
        content = state.get("_content")
        return None if content is None else {str(k): plain(v) for k, v in content.items()}
    if name == "ListConfig":
        content = state.get("_content")
        return None if content is None else [plain(v) for v in content]
    return plain(state.get("_val"))  # AnyNode, StringNode, IntegerNode, EnumNode...


def plain(obj: Any) -> Any:
    """``obj`` with its data-carrying stand-ins made plain: ``argparse.Namespace`` -> dict,
    omegaconf ``DictConfig``/``ListConfig``/nodes -> dict/list/value, an enum member -> its
    value, a numpy scalar -> None (fairseq keeps only bookkeeping in those); containers recursively.
    Other stand-ins stay as they are."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    if not isinstance(obj, Opaque):
        return obj
    if obj.name == "argparse.Namespace":
        return {k: plain(v) for k, v in (obj.state or {}).items()}
    if obj.name.startswith("omegaconf."):
        return _omegaconf_value(obj)
    if issubclass(type(obj), Opaque) and len(obj.args) == 1 and isinstance(obj.args[0], (str, int, float)):
        return obj.args[0]  # an enum member is pickled as Enum(value)
    return None if obj.name.startswith("numpy.") else obj

"""``torch.compile`` for the whole model or chosen parts of it (``trainer.compile``)."""

from __future__ import annotations

from torch import nn

WHOLE_MODEL = "model"


def compile_submodules(model: nn.Module, names: list[str], mode: str | None = None) -> list[str]:
    """Compile the submodules of ``model`` named by dotted path, in place (``nn.Module.compile``:
    parameter names and the state dict stay as they are); ``"model"`` is the whole model. A
    ``ModuleList`` compiles each module in it, so Python between them (eager layer drop) stays
    outside the compiled graphs. ``mode`` is ``torch.compile``'s. Returns the names of the modules
    compiled; raises ValueError naming an unknown path."""
    compiled = []
    for name in names:
        try:
            module = model if name == WHOLE_MODEL else model.get_submodule(name)
        except AttributeError:
            known = ", ".join(n for n, _ in model.named_children())
            raise ValueError(f"trainer.compile: the model has no submodule {name!r} "
                             f"({WHOLE_MODEL!r} is the whole model; top-level parts: {known})") from None
        parts = list(module.named_children()) if isinstance(module, nn.ModuleList) else [("", module)]
        for child_name, child in parts:
            child.compile(mode=mode)
            compiled.append(f"{name}.{child_name}" if child_name else name)
    return compiled

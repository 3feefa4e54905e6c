"""``torch.compile`` for chosen parts of a model (``trainer.compile``)."""

from __future__ import annotations

from torch import nn


def compile_submodules(model: nn.Module, names: list[str]) -> list[str]:
    """Compile the submodules of ``model`` named by dotted path, in place (``nn.Module.compile``:
    parameter names and the state dict stay as they are). A ``ModuleList`` compiles each module in
    it, so Python between them (layer drop) stays outside the compiled graphs. Returns the names of
    the modules compiled; raises ValueError naming an unknown path."""
    compiled = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            known = ", ".join(n for n, _ in model.named_children())
            raise ValueError(f"trainer.compile: the model has no submodule {name!r} "
                             f"(top-level parts: {known})") from None
        parts = list(module.named_children()) if isinstance(module, nn.ModuleList) else [("", module)]
        for child_name, child in parts:
            child.compile()
            compiled.append(f"{name}.{child_name}" if child_name else name)
    return compiled

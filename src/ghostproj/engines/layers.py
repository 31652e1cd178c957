"""Which layers a run projects, and the record of each in the manifest.

The maths of each supported module type lives in :mod:`ghostproj.engines.layer_types`.
"""

from __future__ import annotations

from torch import nn

from .layer_types import LAYER_TYPES, projectable_type

# With a PEFT adapter, its LoRA matrices are what was trained, so they are what is projected.
ADAPTER_LAYERS = r"re:\.lora_[AB]\.[^.]+$"


def type_names(default: bool = False) -> str:
    """The projectable layer types by name (only those chosen without --layers with ``default``)."""
    names = [cls.type_name for cls in LAYER_TYPES if cls.projectable and (cls.projected_by_default or not default)]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def pattern_matches(pattern: str, name: str) -> bool:
    """``re:REGEX`` searches ``name`` for REGEX; anything else is a substring."""
    import re

    from ..errors import GhostprojError

    if pattern.startswith("re:"):
        try:
            return re.search(pattern[3:], name) is not None
        except re.error as exc:
            raise GhostprojError(f"Layer pattern '{pattern}' is not a valid regular expression ({exc}).") from None
    return pattern in name


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output head (HF's output embeddings), if it has one."""
    fn = getattr(model, "get_output_embeddings", None)
    if not callable(fn):
        return None
    try:
        return fn()
    except (NotImplementedError, AttributeError):
        return None


def select_layers(model: nn.Module, patterns: list[str] | None,
                  include_embeddings: bool = False) -> list[tuple[str, nn.Module]]:
    """Modules to project, in module order.

    Without patterns: every supported layer except embeddings and the output head (their
    gradients are vocabulary-sized and rarely what users want to compare); with
    ``include_embeddings`` the embedding layers too. Patterns select any supported layer.
    """
    from ..errors import GhostprojError

    supported = [(n, m) for n, m in model.named_modules() if n and projectable_type(m) is not None]
    if not patterns:
        head = output_head(model)
        chosen = [(n, m) for n, m in supported if m is not head
                  and (include_embeddings or projectable_type(m).projected_by_default)]
        if not chosen:
            raise GhostprojError(f"The model has no supported layer ({type_names(default=True)}) to project.")
        return chosen

    chosen: list[tuple[str, nn.Module]] = []
    seen: set[str] = set()
    all_named = [(n, m) for n, m in model.named_modules() if n]
    for pattern in patterns:
        hits = [(n, m) for n, m in all_named if pattern_matches(pattern, n)]
        if not hits:
            names = ", ".join(n for n, _ in supported[:40])
            more = f" (and {len(supported) - 40} more)" if len(supported) > 40 else ""
            raise GhostprojError(
                f"Layer pattern '{pattern}' matches no module; supported layers are: {names}{more}."
            )
        usable = [(n, m) for n, m in hits if projectable_type(m) is not None]
        uncovered = [(n, m) for n, m in hits if projectable_type(m) is None and not _inside(n, usable)
                     and any(p.dim() >= 2 for p in m.parameters(recurse=False))]
        if uncovered:
            n, m = uncovered[0]
            raise GhostprojError(
                f"Layer pattern '{pattern}' names {n} ({type(m).__name__}), whose weights no layer type covers, so "
                f"its gradient would be silently left out; narrow the pattern to the {type_names()} layers you want "
                "(e.g. re:...).")
        if not usable:
            kinds = sorted({type(m).__name__ for _, m in hits})
            raise GhostprojError(
                f"Layer pattern '{pattern}' matches only unsupported layer types ({', '.join(kinds)}); "
                f"ghostproj projects {type_names()} layers."
            )
        for n, m in usable:
            if n not in seen:
                seen.add(n)
                chosen.append((n, m))
    order = {n: i for i, (n, _) in enumerate(all_named)}
    chosen.sort(key=lambda nm: order[nm[0]])
    return chosen


def _inside(name: str, layers: list[tuple[str, nn.Module]]) -> bool:
    """Whether module ``name`` is part of one of ``layers`` (a LoRA layer's own base Linear)."""
    return any(name.startswith(n + ".") for n, _ in layers)


def layer_owners(model: nn.Module, names: list[str]) -> dict[str, str]:
    """{recorded layer: the name of the module that holds it} for the layers the model has: a
    layer is a module, or a part of one (an expert's matrix of a fused MoE module)."""
    owners = {}
    for module_name, module in model.named_modules():
        kind = projectable_type(module)
        if module_name and kind is not None:
            owners.update({part: module_name for part in kind.parts(module_name, module)})
    return {n: owners[n] for n in names if n in owners}

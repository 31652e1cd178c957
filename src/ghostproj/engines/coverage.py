"""Which share of a model a run covers: the parameters, and the weight matrices, of the
projected layers, by kind of module. A run that skips a kind (an MoE model's experts,
say) says so rather than passing for the whole model."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .layer_types import projectable_type
from .layers import output_head

# The order kinds are reported in; "other" is whatever none of the rules names.
KINDS = ("attention", "mlp", "experts", "router", "embeddings", "norms", "head", "other")


def parameter_kind(module_name: str, module: nn.Module, head: nn.Module | None) -> str:
    """The kind of module a parameter belongs to, from the module's type and its name."""
    name, cls = module_name.lower(), type(module).__name__.lower()
    if head is not None and module is head:
        return "head"
    if isinstance(module, nn.Embedding) or "embedding" in cls:
        return "embeddings"
    if "norm" in cls or name.rsplit(".", 1)[-1].endswith(("norm", "ln_1", "ln_2", "ln_f")):
        return "norms"
    if "expert" in cls or ".experts" in name:
        return "experts"
    if "router" in cls or name.endswith((".gate", ".router")):
        return "router"
    if any(w in name for w in ("attn", "attention")):
        return "attention"
    if any(w in name for w in ("mlp", "feed_forward", "ffn")):
        return "mlp"
    return "other"


@dataclass
class Share:
    covered: int = 0
    total: int = 0

    @property
    def fraction(self) -> float:
        return self.covered / self.total if self.total else 0.0


@dataclass
class Coverage:
    """Parameters (elements) and weight matrices (parameters of two or more dimensions)
    of the model, in all and by kind, and how many of each the projected layers hold."""

    parameters: Share = field(default_factory=Share)
    matrices: Share = field(default_factory=Share)
    by_kind: dict[str, Share] = field(default_factory=dict)  # parameters per kind
    # module type -> its weight matrices that no layer type can project (an MoE's experts)
    unsupported: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"parameters": [self.parameters.covered, self.parameters.total],
                "matrices": [self.matrices.covered, self.matrices.total],
                "by_kind": {k: [s.covered, s.total] for k, s in self.by_kind.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "Coverage":
        return cls(Share(*d["parameters"]), Share(*d["matrices"]), {k: Share(*v) for k, v in d["by_kind"].items()})

    def describe(self) -> str:
        """One line: the share covered, then each kind that is not whole."""
        parts = [f"{100 * s.fraction:.0f}% of {k}" for k, s in self.by_kind.items() if s.covered < s.total]
        text = (f"covers {100 * self.parameters.fraction:.1f}% of the model's parameters "
                f"({self.matrices.covered} of {self.matrices.total} weight matrices)")
        return text + ("; " + ", ".join(parts) if parts else "")


def coverage_notes(cov: Coverage) -> list[str]:
    """A note when the model holds weight matrices that no layer type can project: they are
    in no run, whatever --layers says."""
    if not cov.unsupported:
        return []
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(cov.unsupported.items()))
    return [f"The model holds weight matrices no layer type projects ({kinds}); their gradients are in no "
            "vector, and scores ignore them."]


def engine_coverage(model: nn.Module, engine) -> Coverage:
    """The coverage of an engine's projected layers (a module split in parts covers the
    parameters its parts hold)."""
    covered = set()
    for name, module in engine.modules.items():
        covered.add(id(engine.kinds[name].part_parameter(module, name)))
        if engine.bias and engine.kinds[name].has_bias_column and module.bias is not None:
            covered.add(id(module.bias))
    return model_coverage(model, covered)


def layer_parameters(layers: dict[str, nn.Module], bias: bool) -> set[int]:
    """The parameters whole layers ({name: module}) hold: each weight, and its bias with ``bias``."""
    return {id(p) for m in layers.values() for n, p in m.named_parameters(recurse=False)
            if n == "weight" or (bias and n == "bias")}


def model_coverage(model: nn.Module, covered_ids: set[int]) -> Coverage:
    """The coverage of the parameters ``covered_ids``. Tied parameters count once, under the
    first module that holds them (as ``named_parameters`` lists them)."""
    head = output_head(model)
    owners = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), (name, module, p))
    cov = Coverage(by_kind={})
    for name, module, p in owners.values():
        kind = parameter_kind(name, module, head)
        share = cov.by_kind.setdefault(kind, Share())
        covered = id(p) in covered_ids
        share.total += p.numel()
        cov.parameters.total += p.numel()
        if covered:
            share.covered += p.numel()
            cov.parameters.covered += p.numel()
        if p.dim() >= 2:
            cov.matrices.total += 1
            cov.matrices.covered += covered
            if projectable_type(module) is None:
                cov.unsupported[type(module).__name__] = cov.unsupported.get(type(module).__name__, 0) + 1
    cov.by_kind = {k: cov.by_kind[k] for k in KINDS if k in cov.by_kind}
    return cov

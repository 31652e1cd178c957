"""The engines and the layer types they serve; importing the package registers every type."""

from . import experts, norm_layers  # noqa: F401

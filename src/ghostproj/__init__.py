"""ghostproj: per-example gradient projection and influence scoring."""

from .engines.projection import GradProjectionEngine
from .errors import GhostprojError
from .losses import causal_lm_losses

__version__ = "0.1.0"
__all__ = ["GradProjectionEngine", "GhostprojError", "causal_lm_losses", "__version__"]

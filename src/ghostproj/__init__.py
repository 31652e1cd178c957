"""ghostproj: per-example gradient projection and influence scoring."""

from .engines.dotprod import GradDotProdEngine
from .engines.losses import causal_lm_losses
from .engines.projection import GradProjectionEngine
from .errors import GhostprojError
from .jobs.project import ProjectOptions, run_project
from .scoring.projections import load_projections
from .scoring.score import score

__version__ = "0.1.0"
__all__ = ["GradDotProdEngine", "GradProjectionEngine", "GhostprojError", "causal_lm_losses", "load_projections",
           "ProjectOptions", "run_project", "score", "__version__"]

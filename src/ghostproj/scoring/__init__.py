"""Scoring training vectors against query vectors: ``score`` (dot, cosine, influence;
top-k, selection scores) and ``load_projections`` (a run's vectors)."""

from .influence import fisher_blocks  # noqa: F401
from .projections import Projections, load_projections  # noqa: F401
from .score import METRICS, REDUCTIONS, ScoreResult, check_comparable, score  # noqa: F401
from .topk import StreamingTopK  # noqa: F401
from .transform import NORMALIZATIONS, Transform  # noqa: F401

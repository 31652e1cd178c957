"""Data: reading files (``records``, ``readers``), tokenizing and batching (``batching``),
moving batches and results between host and device (``transfer``)."""

from .batching import (  # noqa: F401
    Batch,
    Example,
    collate,
    fixed_size_batches,
    token_budget_batches,
    tokenize_records,
)
from .records import (  # noqa: F401
    Records,
    example_text,
    file_sha256,
    read_records,
    record_text,
    records_for_run,
)

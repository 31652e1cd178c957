"""The defaults every command and the Python API share, in one place. They are what the
measurements in the README recommend (sections "Choosing the rank" and "Choosing a
metric"); change them there and here together."""

RANK = 256  # per-layer projection budget: k_in * k_out <= RANK
PROJECTOR = "gaussian"
LOSS_REDUCTION = "mean"  # each example's loss averaged over its own label tokens
METRIC = "influence"
NORMALIZE = "layer"
DAMPING = 0.1  # influence: lambda_l = DAMPING * the mean diagonal of layer l's Fisher

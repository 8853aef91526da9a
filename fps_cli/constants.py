"""Names shared by the CLI and the library; importing this module must stay cheap (no torch)."""

METHODS = ("fps", "weight", "activation", "random")
NORMS = ("l1", "l2")
GRANULARITIES = ("neuron", "layer", "global")
PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_BUDGET = 0.0077

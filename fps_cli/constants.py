"""Names shared by the CLI and the library; importing this module must stay cheap (no torch)."""

METHODS = ("fps", "gps", "weight", "activation", "random")
# Methods scored from the per-input activation statistics of one forward pass (or from the weights alone).
ACTIVATION_METHODS = ("fps", "weight", "activation", "random")
GPS_LOSSES = ("supcon", "ce")
NORMS = ("l1", "l2")
GRANULARITIES = ("neuron", "layer", "global")
PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_BUDGET = 0.0077

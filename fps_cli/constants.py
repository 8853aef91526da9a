"""Names shared by the CLI and the library; importing this module must stay cheap (no torch)."""

METHODS = ("fps", "gps", "weight", "activation", "random")
# Methods scored from the per-input activation statistics of one forward pass (or from the weights alone).
ACTIVATION_METHODS = ("fps", "weight", "activation", "random")
# Baselines with a fixed trainable set (no scores, no data pass, no budget): full fine-tuning, linear probing (head
# only) and BitFit (head + every bias).
BASELINE_METHODS = ("full", "linear", "bias")
SELECT_METHODS = METHODS + BASELINE_METHODS
GPS_LOSSES = ("supcon", "ce")
NORMS = ("l1", "l2")
GRANULARITIES = ("neuron", "layer", "global")
PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_BUDGET = 0.0077

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
OPTIMIZERS = ("adamw", "sgd")
# --dataset-format: how --data is read (auto: detected from the folder; see fps_cli.data).
DATASET_FORMATS = ("auto", "folder", "cub", "vtab", "fgvc-json", "timm")
DEFAULT_BUDGET = 0.0077
# Above this, a budget is unusual for sparse fine-tuning (the paper's budgets are below 1%): fps warns.
LARGE_BUDGET = 0.1


def budget_problem(budget: float) -> str | None:
    """The one message for a ``--budget`` outside (0, 1), with the fraction meant when a percentage was given."""
    if 0 < budget < 1:
        return None
    hint = f"; did you mean {budget / 100:g}?" if 1 <= budget < 100 else ""
    return f"--budget is a fraction of all parameters, strictly between 0 and 1 (0.05 = 5%), got {budget:g}{hint}"

"""Plots of the course. Each function returns a matplotlib Figure; each memory category keeps one
colour in every plot."""

# The memory stack's categories, bottom of a stacked bar first, each with its colour.
CATEGORY_COLORS = {
    "weights": "#4C72B0",
    "adapters": "#DD8452",
    "gradients": "#C44E52",
    "optimizer": "#8172B3",
    "activations": "#55A868",
    "temporaries": "#937860",
}

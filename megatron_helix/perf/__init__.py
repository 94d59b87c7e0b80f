"""Performance truth: what a layout communicates, stores and costs.

- ``comm_counter``: measured bytes per process group and op (wraps ``torch.distributed``).
- ``comm_formulas``: the same bytes in closed form, per layer and rank.
- ``memory``: bytes per rank of parameters, gradients, optimizer state, activations and KV
  cache, by formula and by measurement.
- ``calibration`` / ``cost_model``: achieved rates of the machine at hand and the time they
  predict for a layout.
- ``layouts`` / ``planner``: every legal layout of a cluster and its predicted speed and memory.
"""

"""Performance truth: what a layout communicates, stores and costs (docs/PERFORMANCE.md).

- ``comm_counter``: bytes per process group and op, counted at the ``torch.ops.c10d`` ops.
- ``comm_formulas``: the same bytes in closed form, per layer and rank.
- ``memory``: bytes per rank of parameters, gradients, optimizer state, saved activations and
  KV cache, by formula and by measurement.
- ``layouts``: a parallel layout and every legal one; ``work``: what a layer pass computes and
  communicates.
- ``calibration`` (rates and links, GPU assumptions), ``cpu_calibration`` and
  ``collective_bench`` (measured on this machine), ``cost_model`` (work x rates -> time).
- ``planner``: every legal layout ranked, the seed workloads; ``bench``: calibration and the
  4-rank CPU validation.
"""

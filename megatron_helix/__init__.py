"""Helix, ring and layer-wise parallelism for Megatron-LM / megatron-core.

- ``parallel_state.initialize_helix(m, n, ...)``: Megatron's groups with TP = m*n plus the
  helix slice groups.
- ``specs.get_gpt_layer_helix_spec(...)``: Megatron GPT layer specs with helix attention.
- ``sharding.init_from_seed(model, seed)``: the same model for a seed under every layout.
"""

__version__ = "0.1.0"

"""Run the plugin trainer inside a spawned world and record every optimizer step's gradients.

Used by tests that compare helix layouts with one device gradient by gradient, or runs of one
layout with each other.
"""

from __future__ import annotations


def _gradients(model_chunks):
    """``{global name: gradient}`` of this rank's shards as the optimizer will see them."""
    from megatron_helix.sharding import named_global_parameters

    return {global_name: param.main_grad.detach().clone()
            for _, global_name, param in named_global_parameters(model_chunks)}


def _errors_against(reference, model_chunks):
    """``{global name: (largest |shard - one-device shard|, largest |one-device gradient|)}``."""
    from megatron_helix.checkpoint import to_helix
    from megatron_helix.sharding import helix_layouts, named_global_parameters, shard

    layouts = helix_layouts(model_chunks)
    config = model_chunks[0].config
    errors = {}
    for _, global_name, param in named_global_parameters(model_chunks):
        full = reference[global_name]
        for prefix, layout in layouts.items():
            if global_name.startswith(prefix):
                full = to_helix(global_name, full, layout)
        expected = shard(full, param, global_name, config)
        errors[global_name] = (float((param.main_grad - expected).abs().max()),
                               float(full.abs().max()))
    return errors


def train_recording(rank, world_size, runs, references=None):
    """Train each run with the plugin trainer; record the gradients of every optimizer step.

    Without ``references`` (one device) a run returns its losses and full gradients; with
    them, its losses and, per step, how far each of this rank's shards is from the one-device
    gradient of ``references[model]``.
    """
    import megatron.core.optimizer as megatron_optimizer

    from megatron_helix.trainer import build_parser, train

    build_optimizer = megatron_optimizer.get_megatron_optimizer
    results = {}
    for name, (model, argv) in runs.items():
        steps = []

        def recording_optimizer(config, model_chunks, *args, **kwargs):
            optimizer = build_optimizer(config, model_chunks, *args, **kwargs)
            step = optimizer.step

            def recorded_step(*step_args, **step_kwargs):
                if references is None:
                    steps.append(_gradients(model_chunks))
                else:
                    reference = references[model]["gradients"][len(steps)]
                    steps.append(_errors_against(reference, model_chunks))
                return step(*step_args, **step_kwargs)

            optimizer.step = recorded_step
            return optimizer

        megatron_optimizer.get_megatron_optimizer = recording_optimizer
        try:
            losses = [entry["loss"] for entry in train(build_parser().parse_args(argv))]
        finally:
            megatron_optimizer.get_megatron_optimizer = build_optimizer
        results[name] = {"losses": losses, "gradients": steps}
    return results

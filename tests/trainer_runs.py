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


def _parameters(model_chunks):
    """``{global name: parameter}`` (one device: the full tensors)."""
    from megatron_helix.sharding import named_global_parameters

    return {global_name: param.detach().clone()
            for _, global_name, param in named_global_parameters(model_chunks)}


def _errors_against(reference, model_chunks):
    """``{global name: (largest |shard - one-device shard|, largest |one-device gradient|)}``."""
    from megatron_helix.sharding import own_shards

    return {global_name: (float((param.main_grad - expected).abs().max()),
                          float(reference[global_name].abs().max()))
            for global_name, param, expected in own_shards(
                model_chunks, lambda name, _: reference[name])}


def train_recording(rank, world_size, runs, references=None):
    """Train each run with the plugin trainer; record the gradients of every optimizer step.

    Without ``references`` (one device) a run returns its losses, full gradients and the
    parameters each step's gradient was taken at; with them, its losses and, per step, how far
    each of this rank's shards is from the one-device gradient of ``references[model]``. A run
    given as ``(model, argv, "same weights")`` starts every step from the one-device run's
    parameters at that step, so its gradients are compared at identical weights, free of the
    trajectories' drift.
    """
    import megatron.core.optimizer as megatron_optimizer

    from megatron_helix.sharding import load_full_state_dict
    from megatron_helix.trainer import build_parser, train

    build_optimizer = megatron_optimizer.get_megatron_optimizer
    results = {}
    for name, (model, argv, *mode) in runs.items():
        steps, parameters = [], []
        same_weights = mode == ["same weights"]

        def recording_optimizer(config, model_chunks, *args, **kwargs):
            optimizer = build_optimizer(config, model_chunks, *args, **kwargs)
            step = optimizer.step

            def recorded_step(*step_args, **step_kwargs):
                if references is None:
                    steps.append(_gradients(model_chunks))
                    parameters.append(_parameters(model_chunks))
                else:
                    reference = references[model]["gradients"][len(steps)]
                    steps.append(_errors_against(reference, model_chunks))
                stepped = step(*step_args, **step_kwargs)
                if same_weights and len(steps) < len(references[model]["parameters"]):
                    load_full_state_dict(model_chunks, references[model]["parameters"][len(steps)])
                return stepped

            optimizer.step = recorded_step
            return optimizer

        megatron_optimizer.get_megatron_optimizer = recording_optimizer
        try:
            losses = [entry["loss"] for entry in train(build_parser().parse_args(argv))]
        finally:
            megatron_optimizer.get_megatron_optimizer = build_optimizer
        results[name] = {"losses": losses, "gradients": steps}
        if references is None:
            results[name]["parameters"] = parameters
    return results

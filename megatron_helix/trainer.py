"""A small GPT trainer on megatron-core alone, for helix, ring, TP and PP layouts.

Everything but attention is Megatron's: ``GPTModel``, the tensor-parallel linear layers,
``DistributedDataParallel``, the optimizer, ``finalize_model_grads`` and the pipeline
schedules. Launch with ``torchrun``: gloo on CPU, NCCL on GPU. The same ``--seed`` gives the
same model and the same data under every layout, so loss curves are directly comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_helix.arguments import add_helix_args, apply_helix_args
from megatron_helix.model_args import add_model_shape_args
from megatron_helix.synthetic_data import SuccessorTableData
from megatron_helix.trainer_checkpoint import load_checkpoint, save_checkpoint


# The demo's small model; every other shape flag keeps Megatron-LM's default. The trainer
# never ties the output layer to the embedding (planner and loaders read this).
_DEMO_MODEL = dict(
    num_layers=2, hidden_size=64, num_attention_heads=8, seq_length=32, vocab_size=128,
    position_embedding_type="rope", attention_dropout=0.0, hidden_dropout=0.0,
    untie_embeddings_and_output_weights=True,
)


def _rank() -> int:
    """This process's global rank as torchrun sets it before any process group exists."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


class _RankZeroHelpParser(argparse.ArgumentParser):
    """Prints ``--help`` on rank 0 only: under torchrun every rank parses the same command
    line, and the others exit quietly with status 0. Usage errors still print on every rank."""

    def print_help(self, file=None) -> None:
        if _rank() == 0:
            super().print_help(file)


def build_parser() -> argparse.ArgumentParser:
    """Megatron-LM-style flags (same names and meanings) plus the helix group."""
    parser = _RankZeroHelpParser(description=__doc__.splitlines()[0])
    add_model_shape_args(parser, "model", defaults=_DEMO_MODEL)
    train = parser.add_argument_group("training")
    train.add_argument("--micro-batch-size", type=int, default=2)
    train.add_argument("--global-batch-size", type=int, default=None,
                       help="default: micro-batch-size x data-parallel size")
    train.add_argument("--train-iters", type=int, default=20)
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument("--clip-grad", type=float, default=0.0, help="gradient-norm clipping")
    train.add_argument("--bf16", action="store_true")
    train.add_argument("--use-distributed-optimizer", action="store_true",
                       help="shard the optimizer state over the data-parallel ranks")
    ckpt = parser.add_argument_group("checkpointing (Megatron's torch_dist format)")
    ckpt.add_argument("--save", default=None, help="directory to save checkpoints to")
    ckpt.add_argument("--save-interval", type=int, default=None,
                      help="iterations between saves (and at the last iteration)")
    ckpt.add_argument("--load", default=None,
                      help="directory to resume from (its latest complete checkpoint)")
    train.add_argument("--fp16", action="store_true")
    train.add_argument("--metrics-file", default=None,
                       help="append one JSON object per iteration (written by rank 0 only)")
    parallel = parser.add_argument_group("parallelism")
    parallel.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parallel.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parallel.add_argument("--context-parallel-size", type=int, default=1)
    parallel.add_argument("--sequence-parallel", action="store_true",
                          help="Megatron's sequence parallelism (on by itself for MoE with TP)")
    add_helix_args(parser)
    # trainer_checkpoint saves any optimizer in model space (Megatron's flag of that name)
    parser.set_defaults(dist_ckpt_optim_fully_reshardable=True)
    return parser


def _init_distributed() -> None:
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def transformer_config(args, dtype: torch.dtype):
    """Megatron's ``TransformerConfig`` for the trainer's flags (helix sizes already applied)."""
    from megatron.core.distributed import finalize_model_grads

    from megatron_helix.config import HelixTransformerConfig

    moe = dict(
        num_moe_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
        moe_token_dispatcher_type="allgather", moe_aux_loss_coeff=0.0,
    ) if args.num_experts else {}
    on_cpu = not torch.cuda.is_available()
    return HelixTransformerConfig(
        helix_m=args.helix_m,
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels, ffn_hidden_size=args.ffn_hidden_size,
        rotary_interleaved=args.rotary_interleaved, add_bias_linear=args.add_bias_linear,
        gated_linear_unit=args.swiglu, activation_func=F.silu if args.swiglu else F.gelu,
        normalization=args.normalization, qk_layernorm=args.qk_layernorm,
        attention_dropout=args.attention_dropout, hidden_dropout=args.hidden_dropout,
        recompute_granularity=args.recompute_granularity,
        recompute_method="uniform" if args.recompute_granularity == "full" else None,
        recompute_num_layers=1 if args.recompute_granularity == "full" else None,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        sequence_parallel=args.sequence_parallel,
        bf16=args.bf16, fp16=args.fp16, params_dtype=dtype, pipeline_dtype=dtype,
        pipeline_model_parallel_layout=getattr(args, "pipeline_model_parallel_layout", None),
        calculate_per_token_loss=True, finalize_model_grads_func=finalize_model_grads,
        init_method_std=0.02, use_cpu_initialization=True,
        # gloo: unbatched p2p (batched p2p with interleaving misorders on gloo) and no syncs.
        batch_p2p_comm=not on_cpu, batch_p2p_sync=not on_cpu,
        **moe,
    )


def build_model(args, config):
    """This rank's ``GPTModel`` stage, initialized from ``--seed`` (same model for any layout)."""
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_helix.arguments import helix_spec_from_args
    from megatron_helix.sharding import init_from_seed

    if args.helix_m * args.helix_n > 1 or args.context_parallel_size > 1:
        spec = helix_spec_from_args(args)
    else:
        spec = get_gpt_layer_local_spec(
            num_experts=args.num_experts, qk_layernorm=args.qk_layernorm,
            normalization=args.normalization,
        )
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=args.vocab_size,
        max_sequence_length=args.seq_length,
        pre_process=mpu.is_pipeline_first_stage(), post_process=mpu.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=False,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
    )
    if torch.cuda.is_available():
        model.cuda()
    init_from_seed(model, args.seed)
    return model


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Megatron-LM's per-token loss contract: (sum, token count, {name: [sum, count]})."""
    losses = output.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    tokens = mask.sum().to(torch.int)
    return loss, tokens, {"lm loss": torch.stack([loss.detach(), tokens.detach().float()])}


def _forward_step(data_iterator, model):
    from megatron_helix import compat

    batch = next(data_iterator)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    batch = compat.get_batch_on_this_cp_rank(batch)
    output = model(
        batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]
    )
    return output, partial(_loss_func, batch["loss_mask"])


def _micro_batches(data: SuccessorTableData, iteration: int, args, dp_rank: int, count: int):
    """This data-parallel rank's micro-batches of one global batch (Megatron's order)."""
    for i in range(count):
        first = (dp_rank * count + i) * args.micro_batch_size
        yield data.micro_batch(iteration, first, args.micro_batch_size)


def initialize(args) -> torch.dtype:
    """Check the flags, start torch.distributed, build Megatron's and the helix groups, seed.

    Everything is validated before any process group beyond the default one exists. Returns
    the parameter dtype. Undo with ``teardown()``.
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_helix import parallel_state as helix_state
    from megatron_helix.cpu import enable_cpu_execution

    if args.num_experts and args.add_bias_linear:
        raise ValueError(
            "--num-experts needs --disable-bias-linear: megatron-core 0.16.1's SequentialMLP adds "
            "expert biases in place on a view, which autograd rejects"
        )
    if not torch.cuda.is_available():
        if args.bf16 or args.fp16:
            raise ValueError(
                "--bf16/--fp16 training needs CUDA: megatron-core 0.16.1's mixed-precision "
                "optimizer accepts only CUDA parameters (half-precision helix attention itself "
                "runs on CPU: see tests/test_helix_strategies.py)"
            )
    _init_distributed()
    enable_cpu_execution()
    # Megatron-LM's defaults, filled before the helix checks read them.
    args.ffn_hidden_size = args.ffn_hidden_size or 4 * args.hidden_size
    args.kv_channels = args.kv_channels or args.hidden_size // args.num_attention_heads
    apply_helix_args(args, world_size=dist.get_world_size())
    if args.num_experts and args.tensor_model_parallel_size > 1:
        args.sequence_parallel = True  # megatron-core refuses MoE training with TP but no SP
    helix_state.initialize_helix(
        args.helix_m, args.tensor_model_parallel_size // args.helix_m,
        ring_size=args.context_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
    )
    seed = args.seed + 100 * mpu.get_pipeline_model_parallel_rank()
    model_parallel_cuda_manual_seed(seed)
    helix_state.helix_manual_seed(seed)
    torch.manual_seed(seed)
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def teardown() -> None:
    """Destroy Megatron's and the helix groups (the default process group stays)."""
    from megatron.core import parallel_state as mpu

    from megatron_helix import parallel_state as helix_state

    mpu.destroy_model_parallel()
    helix_state.destroy_helix()


def train(args) -> List[Dict[str, float]]:
    """Train ``args.train_iters`` steps; return the per-iteration metrics (on every rank)."""
    dtype = initialize(args)
    try:
        return _train(args, dtype)
    finally:
        teardown()


def _train(args, dtype: torch.dtype) -> List[Dict[str, float]]:
    from megatron.core import parallel_state as mpu
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = transformer_config(args, dtype)
    model = build_model(args, config)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=0.0, clip_grad=args.clip_grad,
                        bf16=args.bf16, fp16=args.fp16, params_dtype=dtype,
                        use_distributed_optimizer=args.use_distributed_optimizer),
        [model],
    )
    config.grad_scale_func = optimizer.scale_loss

    dp_size = mpu.get_data_parallel_world_size()
    global_batch = args.global_batch_size or args.micro_batch_size * dp_size
    if global_batch % (args.micro_batch_size * dp_size):
        raise ValueError(
            f"--global-batch-size {global_batch} must be a multiple of --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {dp_size}"
        )
    num_micro = global_batch // (args.micro_batch_size * dp_size)
    data = SuccessorTableData(args.vocab_size, args.seq_length, args.seed)
    forward_backward = get_forward_backward_func()

    start_iteration = load_checkpoint(args.load, model, optimizer) if args.load else 0
    metrics: List[Dict[str, float]] = []
    for iteration in range(start_iteration, args.train_iters):
        start = time.perf_counter()
        model.zero_grad_buffer()
        optimizer.zero_grad()
        batches = _micro_batches(data, iteration, args, mpu.get_data_parallel_rank(), num_micro)
        reports = forward_backward(
            forward_step_func=_forward_step, data_iterator=batches, model=[model],
            num_microbatches=num_micro, seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, forward_only=False,
        )
        _, grad_norm, _ = optimizer.step()
        loss = _global_loss(reports, mpu)
        elapsed = time.perf_counter() - start
        metrics.append({
            "iteration": iteration + 1, "loss": loss, "grad_norm": float(grad_norm or 0.0),
            "iter_ms": elapsed * 1e3, "tokens_per_s": global_batch * args.seq_length / elapsed,
        })
        if dist.get_rank() == 0:
            _report(metrics[-1], args.metrics_file)
        done = iteration + 1
        if args.save and (done == args.train_iters
                          or (args.save_interval and done % args.save_interval == 0)):
            save_checkpoint(args.save, done, model, optimizer)
    return metrics


def _global_loss(reports, mpu) -> float:
    """Token-weighted loss over all micro-batches and data/context ranks, known on every rank."""
    totals = torch.zeros(2, dtype=torch.float64)
    if mpu.is_pipeline_last_stage():
        for report in reports:
            totals += report["lm loss"].detach().to("cpu", torch.float64)
    on_device = totals.to(torch.cuda.current_device()) if torch.cuda.is_available() else totals
    dist.all_reduce(on_device)  # every rank but the last stages' contributes zeros
    # Each (data, context) replica of the last stage reported its share; tensor-parallel
    # ranks of one replica reported the same numbers, so divide them back out.
    totals = on_device.cpu() / mpu.get_tensor_model_parallel_world_size()
    return float(totals[0] / totals[1])


def _report(entry: Dict[str, float], metrics_file: Optional[str]) -> None:
    print(
        f"iteration {entry['iteration']:4d} | loss {entry['loss']:.6f} | "
        f"{entry['iter_ms']:8.1f} ms | {entry['tokens_per_s']:9.0f} tokens/s",
        flush=True,
    )
    if metrics_file:
        with open(metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.metrics_file and os.path.exists(args.metrics_file) and int(os.environ.get("RANK", 0)) == 0:
        os.remove(args.metrics_file)
    train(args)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

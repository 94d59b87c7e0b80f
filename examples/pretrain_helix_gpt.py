"""Train a small GPT with megatron-core and helix / ring / TP / PP parallelism.

    torchrun --nproc-per-node 4 examples/pretrain_helix_gpt.py \
        --helix-m 2 --helix-n 2 --train-iters 30 --metrics-file helix.jsonl

Flags follow Megatron-LM's names (``--help`` lists them). Gloo on CPU, NCCL on GPU.
"""

from megatron_helix.trainer import main

if __name__ == "__main__":
    main()

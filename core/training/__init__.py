"""The training recipe and what it stands on.

``grpo`` (GRPO + LoRA with TRL: ``train(cfg, build)`` is the recipe every trainer shares),
``datasets`` (prompt datasets), ``layout`` (``gpus`` and ``deepspeed`` as a device layout and its
launcher), ``dist`` (torch.distributed helpers), ``tracking`` (wandb or nothing), ``evaluate``
(reward evaluation of a file of completions) and ``sweep`` (multirun summary). Nothing is imported
here: the recipe pulls in TRL, which a dataset or layout user does not need.
"""

"""samopt inside other trainers. Each integration imports its framework only when used.

- :mod:`samopt.integrations.hf`: :class:`~samopt.integrations.hf.SAMTrainer`, a
  Hugging Face ``transformers.Trainer`` that steps samopt optimizers correctly.
- :mod:`samopt.integrations.lightning`: :class:`~samopt.integrations.lightning.SAMModule`,
  a PyTorch Lightning ``LightningModule`` base that runs the SAM update with manual
  optimisation (bf16, fp16, accumulation, schedulers, checkpoints).
"""

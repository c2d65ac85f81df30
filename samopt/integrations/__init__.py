"""samopt inside other trainers. Each integration imports its framework only when used.

- :mod:`samopt.integrations.hf`: :class:`~samopt.integrations.hf.SAMTrainer`, a
  Hugging Face ``transformers.Trainer`` that steps samopt optimizers correctly.
"""

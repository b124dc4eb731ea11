"""Integrations with the tools users already train with; each submodule is imported only when used.

* :mod:`eagerloco.integrations.dcp`: the outer state as a ``torch.distributed.checkpoint`` ``Stateful``, keyed by
  parameter names, and a safetensors export of the final model (torch only; ``safetensors`` for the export).
* :mod:`eagerloco.integrations.hf`: a Hugging Face ``transformers.TrainerCallback`` that turns ``Trainer`` under
  ``torchrun`` into DiLoCo workers (the ``hf`` extra: ``pip install eagerloco[hf]``).

See ``docs/integrations.md``.
"""

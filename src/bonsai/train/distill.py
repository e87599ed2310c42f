"""Knowledge distillation (Hinton, Vinyals & Dean, 2015): the student learns the labels and a teacher's softened
outputs.

    loss = (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

The T^2 factor keeps the soft loss's gradients on the same scale as the hard loss's whatever the temperature.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, temperature: float, alpha: float, label_smoothing: float = 0.0
) -> torch.Tensor:
    """The mixed loss above, averaged over the batch (logits in float32)."""
    hard = F.cross_entropy(student, y, label_smoothing=label_smoothing)
    if alpha == 0:
        return hard
    t = temperature
    soft = F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), reduction="batchmean", log_target=True)
    return (1 - alpha) * hard + alpha * t * t * soft

"""Knowledge distillation: the loss's math, and a fit that learns from a teacher run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import bonsai
from bonsai.errors import BonsaiError
from bonsai.train.distill import distillation_loss
from conftest import make_images

TINY = dict(arch="resnet8", batch_size=16, quiet=True, precision="fp32")


def test_loss_is_hinton_s_mix_of_hard_and_soft_targets():
    torch.manual_seed(0)
    s, t, y = torch.randn(8, 5), torch.randn(8, 5) * 3, torch.randint(0, 5, (8,))
    T, alpha = 4.0, 0.3
    p_t, log_p_s = F.softmax(t / T, 1), F.log_softmax(s / T, 1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(1).mean()
    expected = (1 - alpha) * F.cross_entropy(s, y) + alpha * T * T * kl
    torch.testing.assert_close(distillation_loss(s, t, y, T, alpha), expected)
    torch.testing.assert_close(distillation_loss(s, t, y, T, 0.0), F.cross_entropy(s, y))
    assert float(distillation_loss(t, t, y, T, 1.0)) == pytest.approx(0.0, abs=1e-6)  # the teacher itself: no loss


def test_soft_gradient_pulls_the_student_toward_the_teacher():
    s = torch.zeros(1, 3, requires_grad=True)
    t = torch.tensor([[5.0, 0.0, 0.0]])
    distillation_loss(s, t, torch.tensor([2]), 2.0, 1.0).backward()  # labels ignored at alpha = 1
    assert s.grad[0, 0] < 0 and s.grad[0, 1] > 0 and s.grad[0, 2] > 0


def test_fit_with_a_teacher(npz_data: Path, tmp_path: Path):
    teacher = bonsai.fit(npz_data, epochs=2, out=str(tmp_path / "teacher"), **TINY)
    student = bonsai.fit(npz_data, epochs=2, out=str(tmp_path / "student"), **(TINY | {"distill.teacher": str(teacher.dir), "distill.alpha": 0.9}))
    plain = bonsai.fit(npz_data, epochs=2, out=str(tmp_path / "plain"), **TINY)
    m_s = [json.loads(x) for x in (student.dir / "metrics.jsonl").read_text().splitlines()]
    m_p = [json.loads(x) for x in (plain.dir / "metrics.jsonl").read_text().splitlines()]
    assert m_s[0]["train_loss"] != m_p[0]["train_loss"]  # the soft targets changed the loss
    assert m_s[-1]["train_flops"] > m_p[-1]["train_flops"]  # the teacher's forward passes are counted
    assert "teacher: " in (student.dir / "config.yaml").read_text()


def test_a_teacher_for_other_classes_is_refused(npz_data: Path, tmp_path: Path):
    x, y = make_images(10, n_classes=2)
    other = tmp_path / "other.npz"
    np.savez(other, x_train=x, y_train=y)
    teacher = bonsai.fit(other, epochs=1, out=str(tmp_path / "t"), **TINY)
    with pytest.raises(BonsaiError, match="the teacher predicts 2 classes"):
        bonsai.fit(npz_data, epochs=1, out=str(tmp_path / "s"), **(TINY | {"distill.teacher": str(teacher.dir)}))


def test_a_teacher_working_at_another_image_size_is_refused_before_anything_is_written(npz_data: Path, tmp_path: Path):
    teacher = bonsai.fit(npz_data, epochs=1, out=str(tmp_path / "t"), **(TINY | {"data.image_size": 24}))
    with pytest.raises(BonsaiError, match="the teacher works on 24px images, this dataset on 16px"):
        bonsai.fit(npz_data, epochs=1, out=str(tmp_path / "s"), **(TINY | {"distill.teacher": str(teacher.dir)}))
    assert not (tmp_path / "s").exists()

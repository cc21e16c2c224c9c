"""Losses against slow references written directly from the paper's equations."""

import math

import torch

from dreamteacher.losses import attention_transfer_loss, whiten, whitened_mse_loss


def slow_layernorm(v: list[float], eps: float = 1e-5) -> list[float]:
    mean = sum(v) / len(v)
    var = sum((x - mean) ** 2 for x in v) / len(v)
    return [(x - mean) / math.sqrt(var + eps) for x in v]


def slow_mse(student, teacher, over: str = "pixel") -> float:
    """Eq. 1: mean over levels of the mean squared error to the LayerNorm of the teacher, taken over
    the channels of each pixel ("pixel") or over each sample's whole map ("layer")."""
    per_level = []
    for s, t in zip(student, teacher):
        b, c, h, w = s.shape
        total = 0.0
        for i in range(b):
            if over == "layer":
                cells = [(k, y, x) for k in range(c) for y in range(h) for x in range(w)]
                target = slow_layernorm([float(t[i][cell]) for cell in cells])
                total += sum((float(s[i][cell]) - v) ** 2 for cell, v in zip(cells, target))
                continue
            for y in range(h):
                for x in range(w):
                    target = slow_layernorm([float(t[i, k, y, x]) for k in range(c)])
                    total += sum((float(s[i, k, y, x]) - target[k]) ** 2 for k in range(c))
        per_level.append(total / (b * c * h * w))
    return sum(per_level) / len(per_level)


def slow_at(student, teacher, p: int = 2) -> float:
    """Eq. 2: mean over levels and samples of || Q^r/|Q^r| - Q^g/|Q^g| ||_p, Q = sum_c |A_c|^p."""
    per_level = []
    for s, t in zip(student, teacher):
        b, c, h, w = s.shape
        dists = []
        for i in range(b):
            qs = [sum(abs(float(s[i, k, y, x])) ** p for k in range(c)) for y in range(h) for x in range(w)]
            qt = [sum(abs(float(t[i, k, y, x])) ** p for k in range(c)) for y in range(h) for x in range(w)]
            ns, nt = math.sqrt(sum(q * q for q in qs)), math.sqrt(sum(q * q for q in qt))
            dists.append(sum(abs(a / ns - b_ / nt) ** p for a, b_ in zip(qs, qt)) ** (1 / p))
        per_level.append(sum(dists) / b)
    return sum(per_level) / len(per_level)


def _pairs(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 5, 4, 3), (2, 7, 2, 2)]
    student = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    teacher = [torch.randn(s, generator=g, dtype=torch.float64) * 3 + 1 for s in shapes]
    return student, teacher


def test_whiten_is_layernorm_over_channels():
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64) * 5 + 2
    w = whiten(x)
    assert torch.allclose(w.mean(1), torch.zeros(2, 3, 4, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(w.var(1, unbiased=False), torch.ones(2, 3, 4, dtype=torch.float64), atol=1e-4)


def test_whitened_mse_matches_equation_1():
    student, teacher = _pairs()
    assert abs(float(whitened_mse_loss(student, teacher)) - slow_mse(student, teacher)) < 1e-5


def test_whitening_over_the_layer_keeps_the_spatial_energy_pattern():
    student, teacher = _pairs(3)
    assert abs(float(whitened_mse_loss(student, teacher, "layer")) - slow_mse(student, teacher, "layer")) < 1e-5
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 3, 4, generator=g, dtype=torch.float64)
    x[:, :, 0, 0] *= 10  # one loud pixel: attention transfer's target
    energy = lambda f: f.pow(2).sum(1)  # noqa: E731
    per_pixel, per_layer = whiten(x, "pixel"), whiten(x, "layer")
    assert torch.allclose(energy(per_pixel), torch.full((2, 3, 4), 6.0, dtype=torch.float64), atol=1e-3)
    assert (energy(per_layer).flatten(1).argmax(1) == 0).all()
    assert torch.allclose(per_layer.flatten(1).mean(1), torch.zeros(2, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(per_layer.flatten(1).var(1, unbiased=False), torch.ones(2, dtype=torch.float64), atol=1e-4)


def test_attention_transfer_matches_equation_2():
    student, teacher = _pairs(1)
    assert abs(float(attention_transfer_loss(student, teacher, p=2)) - slow_at(student, teacher, 2)) < 1e-5


def test_attention_transfer_is_zero_for_rescaled_features():
    student, _ = _pairs(2)
    scaled = [s * 7.0 for s in student]  # AT compares normalized maps: a global scale does not matter
    assert float(attention_transfer_loss(student, scaled)) < 1e-6

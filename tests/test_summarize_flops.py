"""``explain.summarize`` counts MACs with torch's FlopCounterMode: functional convolutions and matrix products count
as much as their nn.Module forms; the layer table still has a row per leaf module call."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpsearch.explain import summarize


class _Functional(nn.Module):
    """A conv and a matmul written as functions (no Conv2d, no Linear), then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4, 1, 3, 3))
        self.project = nn.Parameter(torch.zeros(8, 8))
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, padding=1)  # [1, 4, 8, 8]
        x = x @ self.project  # [1, 4, 8, 8] x [8, 8]
        return self.head(x.flatten(1) + 0)  # the addition counts nothing


def test_functional_convolutions_and_matmuls_are_counted() -> None:
    s = summarize(_Functional(), channels=1, size=8)
    conv, matmul, head = 4 * 8 * 8 * 9, 4 * 8 * 8 * 8, 256 * 10
    assert s.macs == conv + matmul + head
    assert [(r.name, r.kind, r.macs) for r in s.layers] == [("head", "Linear", head)]


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.conv(x))


def test_a_module_called_twice_has_a_row_per_call() -> None:
    s = summarize(_Twice(), channels=2, size=4)
    one = 2 * 4 * 4 * 2 * 9
    assert [(r.name, r.macs) for r in s.layers] == [("conv", one), ("conv", one)]
    assert s.macs == 2 * one

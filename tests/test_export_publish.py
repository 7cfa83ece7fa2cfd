"""export-model publishes a verified file and its card together: the card is written first (a full disk fails there,
before an earlier export is replaced), and a model that then cannot be moved into place takes its card back.
(test_export.py covers the card's own failed write through the CLI.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from hpsearch import export as exporting
from hpsearch._errors import HpsearchError
from hpsearch.saved_model import Classifier


def test_a_model_that_cannot_be_moved_into_place_takes_its_card_back(tmp_path: Path, monkeypatch) -> None:
    model = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), mean=[0.5], std=[0.25], input_size=None).eval()
    images = torch.randint(0, 256, (4, 1, 2, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = tmp_path / "exported" / "m.pt"
    real = Path.replace

    def full(self: Path, target: Path) -> Path:
        if Path(target) == out:
            raise OSError(28, "No space left on device")
        return real(self, target)

    monkeypatch.setattr(Path, "replace", full)
    with pytest.raises(HpsearchError, match=r"^--out: cannot write '.*m\.pt' \(No space left on device\)$"):
        exporting._export_verified(model, "torchscript", out, images, (1, 2, 6), lambda **measured: {"card": 1})
    assert not (tmp_path / "exported").exists()  # no card, no model, no temporary file, no folder

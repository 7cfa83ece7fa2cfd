"""Issue #27, data items: bad input is one line naming the bad value and what is allowed (exit 2 for bad input,
1 for other failures), no traceback, nothing half-written.

10: --data-dir (or HPSEARCH_DATA) naming a file; 11: a folder dataset with a single class; 15: load_model on a
.pt that is truncated, not a torch file, or empty."""

from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
from PIL import Image

from hpsearch._errors import HpsearchError, SpecError
from hpsearch.data import DataInfo, _load, read_raw
from tests.conftest import ONE_CONFIG_SPACE, study_text


def _one_line_error(result, code: int) -> str:
    assert result.code == code, result
    assert result.err.startswith("error: "), result
    assert len(result.err.strip().splitlines()) == 1, result
    assert "Traceback" not in result.err + result.out, result
    return result.err


def _write_folder(root: Path, classes: list[str], per_class: int = 4) -> None:
    rng = np.random.default_rng(0)
    for cls in classes:
        d = root / "train" / cls
        d.mkdir(parents=True)
        for j in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB").save(d / f"{j}.png")


def _study(write_study, dataset: str) -> Path:
    return write_study(dataset=f'dataset = "{dataset}"', space=ONE_CONFIG_SPACE, epochs=1, n_trials=1,
                       extra='pruner = "none"')


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """torchvision's download is never tried (offline and fast): it records its calls and fails."""
    calls: list[str] = []

    def download(name: str, root: Path) -> str:
        calls.append(name)
        return "URLError: no network in tests"

    monkeypatch.setattr(_load, "_download", download)
    return calls


# ---------------------------------------------------------------- 10: the data directory is a file


@pytest.mark.parametrize("dataset", ["mnist", "cifar10", "folder:pets"])
def test_data_dir_that_is_a_file_is_named_as_such(run_cli, write_study, tmp_path: Path, no_download, dataset: str):
    _write_folder(tmp_path / "data" / "pets", ["cat", "dog"])  # where HPSEARCH_DATA points: not used
    not_a_dir = tmp_path / "datasets.tar"
    not_a_dir.write_bytes(b"not a directory")
    err = _one_line_error(run_cli("run", str(_study(write_study, dataset)), "--data-dir", str(not_a_dir)), 2)
    assert err.startswith(f"error: --data-dir: {str(not_a_dir)!r} is a file, not a directory"), err
    assert no_download == []  # refused before any download
    assert not (tmp_path / "hpsearch.db").exists()  # nothing written


def test_hpsearch_data_that_is_a_file_names_the_variable(run_cli, write_study, tmp_path: Path, no_download,
                                                          monkeypatch: pytest.MonkeyPatch):
    not_a_dir = tmp_path / "data.txt"
    not_a_dir.write_text("x")
    monkeypatch.setenv("HPSEARCH_DATA", str(not_a_dir))
    err = _one_line_error(run_cli("run", str(_study(write_study, "fashion-mnist"))), 2)
    assert err.startswith(f"error: HPSEARCH_DATA: {str(not_a_dir)!r} is a file, not a directory"), err
    assert no_download == []


def test_folder_dataset_path_that_is_a_file(tmp_path: Path):
    path = tmp_path / "pets.zip"
    path.write_bytes(b"PK")
    with pytest.raises(SpecError, match=r"^dataset 'folder:.*pets\.zip': '.*pets\.zip' is a file, not a directory"):
        read_raw(f"folder:{path}", tmp_path / "data", tmp_path / "cache")


# ---------------------------------------------------------------- 11: a single class


def test_single_class_folder_is_refused(run_cli, write_study, tmp_path: Path):
    _write_folder(tmp_path / "data" / "cats", ["cat"])
    err = _one_line_error(run_cli("run", str(_study(write_study, "folder:cats"))), 2)
    assert str(tmp_path / "data" / "cats" / "train") in err and "'cat'" in err, err
    assert "at least 2 classes" in err, err
    assert not (tmp_path / "hpsearch.db").exists()
    assert not list((tmp_path / "cache").rglob("*.pt"))  # no decoded cache written either


def test_folder_with_images_in_one_class_only_is_refused(tmp_path: Path):
    _write_folder(tmp_path / "data" / "pets", ["cat"])
    (tmp_path / "data" / "pets" / "train" / "dog").mkdir()  # a class folder without images
    with pytest.raises(SpecError, match=r"only class 'cat' has images .* \(none in 'dog'\).*at least 2 classes"):
        read_raw("folder:pets", tmp_path / "data", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- 15: load_model on a broken .pt


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ``evaluate --save`` pair (.pt and .json), written by save_model without training (fast)."""
    import hpsearch
    from hpsearch.saved_model import built_info, save_model
    from hpsearch.spec import spec_from_dict
    from hpsearch.strategies import STRATEGIES

    spec = spec_from_dict(tomllib.loads(study_text(space=ONE_CONFIG_SPACE)), where="test")
    info = DataInfo(name=spec.dataset, channels=1, height=12, width=12, num_classes=3, mean=(0.5,), std=(0.25,),
                    flip=True, classes=("class0", "class1", "class2"))
    strategy = STRATEGIES[spec.strategy]
    trial = optuna.create_study().ask()  # in memory: the parameters the strategy suggests
    config = strategy.suggest(trial, spec.space, spec.epochs, info)
    built = strategy.build(config, info)
    stem = tmp_path_factory.mktemp("models") / "tiny-trial0-seed0"
    weights = save_model(built.model, built_info(built, info), SimpleNamespace(number=0, params=trial.params), spec,
                         config, 0, stem)
    hpsearch.load_model(weights)  # the untouched pair loads
    return weights


def _broken(saved: Path, tmp_path: Path, how: str) -> Path:
    shutil.copy(saved.with_suffix(".json"), tmp_path / saved.with_suffix(".json").name)
    weights = tmp_path / saved.name
    data = saved.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "random": os.urandom(4096), "empty": b""}[how])
    return weights


@pytest.mark.parametrize("how", ["truncated", "random", "empty"])
def test_load_model_with_a_broken_weights_file(saved_model: Path, tmp_path: Path, how: str):
    import hpsearch

    weights = _broken(saved_model, tmp_path, how)
    with pytest.raises(HpsearchError) as e:
        hpsearch.load_model(weights)
    message = str(e.value)
    assert message.startswith(f"load_model: cannot read {str(weights)!r} ("), message
    assert len(message.splitlines()) == 1 and "PytorchStreamReader" not in message, message
    assert "weights_only" not in message, message  # torch's advice to load an untrusted file unsafely

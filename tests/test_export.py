"""`hpsearch export-model`: a trial's model as one self-contained TorchScript or ONNX file with its model card,
checked against PyTorch before anything is written (issue #26)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

import hpsearch
from hpsearch import data as datasets
from hpsearch import export as exporting
from hpsearch.evaluate import eval_seed
from tests.conftest import ONE_CONFIG_SPACE, study_text
from tests.test_hardening import read_only

STORAGE = "sqlite:///hpsearch.db"
GREY = "synthetic:classes=3,size=12,train=192,test=32"
RGB = "synthetic:classes=3,size=12,channels=3,train=192,test=32"

# The exported file run where hpsearch cannot be imported (and, for ONNX, torch neither): self-contained.
RUN_TORCHSCRIPT = """
import sys
sys.modules["hpsearch"] = None
import numpy as np, torch
x = torch.from_numpy(np.load(sys.argv[2]))
m = torch.jit.load(sys.argv[1])
with torch.no_grad():
    out = torch.cat([m(x[:1]), m(x[1:])])  # two batch sizes: the batch axis is dynamic
np.save(sys.argv[3], out.numpy())
"""
RUN_ONNX = """
import sys
sys.modules["hpsearch"] = None
sys.modules["torch"] = None
import numpy as np, onnxruntime as ort
x = np.load(sys.argv[2])
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
name = s.get_inputs()[0].name
np.save(sys.argv[3], np.concatenate([s.run(None, {name: x[:1]})[0], s.run(None, {name: x[1:]})[0]]))
"""


def _study(run_cli, write_study, *, dataset: str = GREY, tta: str = "none", n_trials: int = 1) -> None:
    extra = f'pruner = "none"\ntta = "{tta}"'
    text = study_text(n_trials=n_trials, extra=extra, space=ONE_CONFIG_SPACE, dataset=f'dataset = "{dataset}"')
    result = run_cli("run", str(write_study(text=text)))
    assert result.code == 0, result


def _val_images(dataset: str) -> torch.Tensor:
    return datasets.load(dataset, data_dir=Path("data"), cache_dir=Path("cache"), device=torch.device("cpu"),
                         val_fraction=0.1).val.x


def _run_outside(script: str, model: Path, x: np.ndarray, tmp_path: Path) -> np.ndarray:
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([sys.executable, "-c", script, str(model), str(tmp_path / "x.npy"),
                           str(tmp_path / "y.npy")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return np.load(tmp_path / "y.npy")


@pytest.mark.parametrize(("fmt", "out", "dataset", "tta", "script"), [
    ("torchscript", "m.pt", GREY, "none", RUN_TORCHSCRIPT),
    ("onnx", "m.onnx", RGB, "flip-translate", RUN_ONNX),  # RGB, and TTA's mirror and reflect-padded shifts inside
])
def test_export_round_trip(run_cli, write_study, tmp_path: Path, fmt, out, dataset, tta, script):
    _study(run_cli, write_study, dataset=dataset, tta=tta)
    assert run_cli("evaluate", "tiny", "--seeds", "2", "--save", "models").code == 0
    result = run_cli("export-model", "tiny", "--seed", "1", "--out", f"exported/{out}")
    assert result.code == 0, result
    path, card_file = tmp_path / "exported" / out, tmp_path / "exported" / f"{out}.json"
    assert sorted(p.name for p in path.parent.iterdir()) == [out, f"{out}.json"]  # no temporary file left
    assert f"wrote exported/{out} ({fmt}, " in result.out and "checked on 19 validation images" in result.out

    # The file alone, without hpsearch: PyTorch's Classifier (the saved model) gives the same logits.
    x = _val_images(dataset)[:10]
    classifier = hpsearch.load_model(tmp_path / "models" / "tiny-trial0-seed1.pt")
    with torch.no_grad():
        expected = classifier(x).numpy()
    got = _run_outside(script, path, x.numpy(), tmp_path)
    assert got.shape == (10, 3)
    assert np.abs(got - expected).max() <= 1e-4 and (got.argmax(1) == expected.argmax(1)).all()

    card = json.loads(card_file.read_text())
    study = optuna.load_study(study_name="tiny", storage=STORAGE)
    record = study.user_attrs["evaluate:0"]
    channels = 3 if dataset == RGB else 1
    assert card["format"] == fmt and card["file"] == out
    assert card["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and card["bytes"] == path.stat().st_size
    assert card["input"] == {"name": "images", "dtype": "uint8", "shape": ["B", channels, 12, 12], "layout": "NCHW",
                             "channels": "RGB" if channels == 3 else "L",
                             "range": "0..255 (normalisation, resize and test-time augmentation are inside the model)"}
    assert card["output"]["shape"] == ["B", 3] and card["classes"] == ["class0", "class1", "class2"]
    assert (card["dataset"], card["study"], card["trial"], card["seed_index"]) == (dataset, "tiny", 0, 1)
    assert card["seed"] == eval_seed(0, 0, 1) and card["params"] == study.trials[0].params
    assert card["validation_accuracy"] == study.trials[0].value
    assert card["test_accuracy"] == record["runs"][1]["test_accuracy"]
    assert (card["test_accuracy_mean"], card["test_accuracy_std"], card["test_seeds"]) == (
        pytest.approx(record["mean"]), pytest.approx(record["std"]), 2)
    assert card["param_count"] == study.trials[0].user_attrs["param_count"]
    views = 6 if tta == "flip-translate" else 1
    assert card["tta_views"] == views and card["macs_per_image"] == views * card["macs_per_view"] > 0
    assert card["verification"]["split"] == "validation" and card["verification"]["images"] == 19
    assert card["verification"]["argmax_agreement"] == 1.0 and card["verification"]["max_abs_logit_diff"] <= 1e-3
    assert set(card["latency_ms_per_image"]) == {"batch_1", "batch_64"}
    assert all(v > 0 for v in card["latency_ms_per_image"].values())
    assert card["versions"]["torch"] == torch.__version__ and card["versions"]["hpsearch"] == hpsearch.__version__
    assert card["source"] == {"model": "models/tiny-trial0-seed1.pt", "retrained": False}
    assert card["exporter"].startswith("torch.jit.trace" if fmt == "torchscript" else "torch.onnx.export(dynamo=True)")


def test_a_saved_model_is_exported_without_retraining(run_cli, write_study, monkeypatch):
    _study(run_cli, write_study)
    assert run_cli("evaluate", "tiny", "--seeds", "1", "--save", "models").code == 0
    from hpsearch import evaluate as final
    calls: list[int] = []
    real = final._retrain
    monkeypatch.setattr(final, "_retrain", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    result = run_cli("export-model", "tiny", "--out", "m.pt")
    assert result.code == 0, result
    assert calls == [] and "trial 0 seed 0: the model evaluate saved, models/tiny-trial0-seed0.pt" in result.out
    assert json.loads(Path("m.pt.json").read_text())["source"]["retrained"] is False


def test_without_a_saved_model_export_retrains_and_stores_the_test_accuracy(run_cli, write_study, monkeypatch,
                                                                            tmp_path: Path):
    _study(run_cli, write_study)
    from hpsearch import evaluate as final
    calls: list[int] = []
    real = final._retrain
    monkeypatch.setattr(final, "_retrain", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    result = run_cli("export-model", "tiny", "--seed", "1", "--out", "m.pt")
    assert result.code == 0, result
    assert calls == [0, 1]  # evaluate's rules: seeds 0..1, each stored with its test accuracy and saved
    assert ("trial 0 seed 1: no saved model (evaluate --save), retraining it as evaluate does (its test accuracy is "
            f"stored); models in {tmp_path / 'cache' / 'models'}") in result.out
    record = optuna.load_study(study_name="tiny", storage=STORAGE).user_attrs["evaluate:0"]
    assert len(record["runs"]) == 2
    assert record["runs"][1]["saved"] == str(tmp_path / "cache/models/tiny-trial0-seed1.pt")
    card = json.loads(Path("m.pt.json").read_text())
    assert card["test_accuracy"] == record["runs"][1]["test_accuracy"] and card["source"]["retrained"] is True

    result = run_cli("export-model", "tiny", "--seed", "1", "--out", "again.pt")  # saved now: not retrained
    assert result.code == 0 and calls == [0, 1]
    Path(record["runs"][1]["saved"]).unlink()  # the saved file is gone: that seed is retrained (seed 0 is kept)
    result = run_cli("export-model", "tiny", "--seed", "1", "--out", "third.pt")
    assert result.code == 0 and calls == [0, 1, 1]


def test_an_export_that_disagrees_with_pytorch_is_refused_and_leaves_nothing(run_cli, write_study, monkeypatch,
                                                                              tmp_path: Path):
    _study(run_cli, write_study)
    assert run_cli("evaluate", "tiny", "--seeds", "1", "--save", "models").code == 0
    real = exporting.exported_logits
    monkeypatch.setattr(exporting, "exported_logits", lambda runtime, x: real(runtime, x) + 0.01)
    result = run_cli("export-model", "tiny", "--out", "out/m.onnx")
    assert result.code == 1
    assert result.err.startswith("error: export-model: the exported onnx model disagrees with PyTorch's on 19 "
                                 "validation images (argmax agreement 100.0000%, needs >= 99.9%; max |logit diff| 0.01")
    assert result.err.endswith("needs <= 0.001); nothing was written\n") and result.err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # the folder it made is gone too: no model, card or temporary file


def test_bad_inputs_are_one_line_errors(run_cli, write_study, tmp_path: Path):
    _study(run_cli, write_study)
    study = optuna.load_study(study_name="tiny", storage=STORAGE)
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, params={}, distributions={},
                                              intermediate_values={0: 0.3}))
    (tmp_path / "adir.pt").mkdir()
    cases = [
        (("nope", "--out", "m.pt"), 2, "error: study 'nope' does not exist in this storage; studies: tiny"),
        (("tiny", "--trial", "1", "--out", "m.pt"), 2, "error: --trial 1: trial 1 of study 'tiny' is PRUNED; only "
                                                       "complete trials have a final model to export (complete: 0)"),
        (("tiny", "--trial", "5", "--out", "m.pt"), 2, "error: --trial 5: trial 5 of study 'tiny' does not exist; "
                                                       "only complete trials have a final model to export "
                                                       "(complete: 0)"),
        (("tiny", "--format", "tflite", "--out", "m.pt"), 2, "error: --format 'tflite': allowed: torchscript, onnx"),
        (("tiny", "--out", "m.txt"), 2, "error: --out 'm.txt': the file name must end in .pt (torchscript), .pth "
                                        "(torchscript), .ts (torchscript), .onnx (onnx)"),
        (("tiny", "--format", "onnx", "--out", "m.pt"), 2, "error: --out 'm.pt': --format onnx needs a file name "
                                                          "ending in .onnx"),
        (("tiny", "--seed", "-1", "--out", "m.pt"), 2, "error: --seed '-1': input should be greater than or equal "
                                                       "to 0"),
        (("tiny", "--out", "adir.pt"), 2, "error: --out 'adir.pt' is a directory; give a file name ending in .pt, "
                                          ".pth, .ts"),
    ]
    for args, code, message in cases:
        result = run_cli("export-model", *args)
        assert (result.code, result.err) == (code, message + "\n"), args
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only(ro):
        result = run_cli("export-model", "tiny", "--out", "ro/m.onnx")
        assert result.code == 2 and re.fullmatch(r"error: --out: cannot write to the directory 'ro' \((Permission "
                                                 r"denied|Operation not permitted)\); make it writable or choose "
                                                 r"another\n", result.err), result
        assert list(ro.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".pt", ".onnx", ".json", ".txt")) == ["adir.pt"]


def test_a_failed_write_leaves_neither_file(run_cli, write_study, monkeypatch, tmp_path: Path):
    """The card is written last; a disk that fills up then takes the model back too (no tmp, no half export)."""
    _study(run_cli, write_study)
    assert run_cli("evaluate", "tiny", "--seeds", "1", "--save", "models").code == 0
    real = Path.replace

    def full(self: Path, target: Path) -> Path:
        if str(target).endswith(".json") and "exported" in str(target):
            raise OSError(28, "No space left on device")
        return real(self, target)

    monkeypatch.setattr(Path, "replace", full)
    result = run_cli("export-model", "tiny", "--out", "exported/m.pt")
    assert (result.code, result.err) == (1, "error: --out: cannot write 'exported/m.pt' (No space left on device)\n")
    assert not (tmp_path / "exported").exists()

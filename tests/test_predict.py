"""`hpsearch predict`: top classes of image files from an exported model (issue #26); an .onnx model runs without
torch."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import hpsearch
from hpsearch import cli
from hpsearch import data as datasets
from hpsearch import predict as predicting
from hpsearch.data import _readers
from tests.conftest import ONE_CONFIG_SPACE, study_text

GREY = "synthetic:classes=3,size=12,train=192,test=32"
CLASSES = ["class0", "class1", "class2"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One study, its model saved by evaluate and exported in both formats (model.onnx, model.pt, their cards)."""
    root = tmp_path_factory.mktemp("exported")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("HPSEARCH_CACHE", str(root / "cache"))
        mp.setenv("HPSEARCH_DATA", str(root / "data"))
        mp.delenv("HPSEARCH_STORAGE", raising=False)
        (root / "study.toml").write_text(study_text(n_trials=1, extra='pruner = "none"', space=ONE_CONFIG_SPACE))
        for args in (["run", "study.toml"], ["evaluate", "tiny", "--seeds", "1", "--save", "models"],
                     ["export-model", "tiny", "--out", "model.onnx"], ["export-model", "tiny", "--out", "model.pt"]):
            mp.setattr(sys, "argv", ["hpsearch", *args])
            try:
                cli.main()
            except SystemExit as e:
                assert not e.code, args
    yield root


def _softmax(x: torch.Tensor) -> np.ndarray:
    return torch.softmax(x.double(), 1).numpy()


def _expected(exported: Path, x: torch.Tensor) -> np.ndarray:
    """Probabilities from PyTorch's Classifier (the model evaluate saved) on uint8 images."""
    model = hpsearch.load_model(exported / "models" / "tiny-trial0-seed0.pt")
    with torch.no_grad():
        return _softmax(model(x))


def _write_pngs(folder: Path, n: int) -> tuple[list[Path], torch.Tensor]:
    """``n`` validation images as grey PNGs of the model's size (lossless: read back as they were)."""
    x = datasets.load(GREY, data_dir=Path("data"), cache_dir=Path("cache"), device=torch.device("cpu"),
                      val_fraction=0.1).val.x[:n]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(x):
        paths.append(folder / f"img{i}.png")
        Image.fromarray(image[0].numpy(), mode="L").save(paths[-1])
    return paths, x


@pytest.mark.parametrize("model", ["model.onnx", "model.pt"])
def test_json_lines_give_pytorchs_probabilities(run_cli, exported: Path, model: str):
    paths, x = _write_pngs(Path("imgs"), 6)
    result = run_cli("predict", str(exported / model), "imgs", "--json", "--top", "3", "--batch-size", "4")
    assert result.code == 0 and result.err == "", result
    rows = [json.loads(line) for line in result.out.splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in paths]  # sorted, all of them (two batches: 4 + 2)
    expected = _expected(exported, x)
    for row, probs in zip(rows, expected, strict=True):
        assert [t["class"] for t in row["top"]] == [CLASSES[i] for i in np.argsort(-probs, kind="stable")]
        assert [t["probability"] for t in row["top"]] == pytest.approx(sorted(probs, reverse=True), abs=1e-5)


def test_a_folder_with_broken_files_reports_each_and_predicts_the_rest(run_cli, exported: Path):
    paths, _ = _write_pngs(Path("imgs/sub"), 3)
    Path("imgs/broken.png").write_bytes(b"not an image")
    Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save("full.jpg")
    data = Path("full.jpg").read_bytes()
    Path("imgs/truncated.jpg").write_bytes(data[: len(data) // 2])
    Path("imgs/notes.txt").write_text("not an image suffix: skipped")
    result = run_cli("predict", str(exported / "model.onnx"), "imgs", "--top", "2")
    assert result.code == 1
    errors = result.err.splitlines()
    assert errors[0] == "error: imgs/broken.png: cannot read the image (cannot identify image file 'imgs/broken.png')"
    assert len(errors) == 2 and errors[1].startswith("error: imgs/truncated.jpg: cannot read the image (")  # PIL's why
    assert "truncated" in errors[1].lower() and errors[1].endswith(")")
    lines = [line.split("\t") for line in result.out.splitlines()]
    assert [line[0] for line in lines] == [str(p) for p in paths]
    for line in lines:  # path, then class and probability for the top 2, the most probable first
        assert len(line) == 5 and line[1] in CLASSES and line[3] in CLASSES and float(line[2]) >= float(line[4])


def test_top_k_is_at_most_the_classes_and_a_terminal_gets_a_table(run_cli, exported: Path, monkeypatch):
    _write_pngs(Path("imgs"), 2)
    one = [line.split("\t") for line in run_cli("predict", str(exported / "model.onnx"), "imgs", "--top", "1").out
           .splitlines()]
    assert [len(line) for line in one] == [3, 3]
    every = run_cli("predict", str(exported / "model.onnx"), "imgs", "--json", "--top", "10").out.splitlines()
    assert [len(json.loads(line)["top"]) for line in every] == [3, 3]
    assert sum(t["probability"] for t in json.loads(every[0])["top"]) == pytest.approx(1.0)
    monkeypatch.setattr(cli.console, "_force_terminal", True)
    table = run_cli("predict", str(exported / "model.onnx"), "imgs", "--top", "2")
    assert table.code == 0 and "#1" in table.out and "#2" in table.out and "#3" not in table.out
    assert "imgs/img0.png" in table.out and "\t" not in table.out


def test_other_channels_and_sizes_are_converted_as_the_folder_datasets_read_them(run_cli, exported: Path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(rgb).save("colour.png")
    result = run_cli("predict", str(exported / "model.pt"), "colour.png", "--json")
    assert result.code == 0, result
    grey = np.asarray(Image.fromarray(rgb).convert("L").resize((12, 12), Image.Resampling.BILINEAR))
    expected = _expected(exported, torch.from_numpy(grey.copy())[None, None])[0]
    top = json.loads(result.out)["top"]
    assert [t["probability"] for t in top] == pytest.approx(sorted(expected, reverse=True), abs=1e-5)


def test_bad_models_are_one_line_errors(run_cli, exported: Path, tmp_path: Path):
    _write_pngs(Path("imgs"), 1)
    onnx = (exported / "model.onnx").read_bytes()
    card = (exported / "model.onnx.json").read_text()
    Path("nocard.onnx").write_bytes(onnx)
    Path("changed.onnx").write_bytes(onnx[:-1] + bytes([onnx[-1] ^ 1]))
    Path("changed.onnx.json").write_text(card)
    Path("garbled.onnx").write_bytes(onnx)
    Path("garbled.onnx.json").write_text('{"format": "onnx"}')
    Path("notjson.onnx").write_bytes(onnx)
    Path("notjson.onnx.json").write_text("{")
    junk = b"not an onnx model"
    Path("junk.onnx").write_bytes(junk)
    import hashlib
    Path("junk.onnx.json").write_text(card.replace(json.loads(card)["sha256"], hashlib.sha256(junk).hexdigest()))
    cases = {
        "missing.onnx": "no such file (a file written by hpsearch export-model)",
        "nocard.onnx": "its model card 'nocard.onnx.json' is not beside it (hpsearch export-model writes FILE.json "
                       "with FILE)",
        "changed.onnx": "the file does not match its model card 'changed.onnx.json' (sha256 differs): it was changed "
                        "or damaged after export, or the card belongs to another model",
        "garbled.onnx": "its model card 'garbled.onnx.json' lacks or garbles format, input.shape [B, C, H, W] (C 1 "
                        "or 3) or classes",
        "notjson.onnx": "cannot read its model card 'notjson.onnx.json' (Expecting property name enclosed in double "
                        "quotes: line 1 column 2 (char 1))",
    }
    for name, message in cases.items():
        result = run_cli("predict", name, "imgs")
        assert (result.code, result.err, result.out) == (2, f"error: MODEL {name!r}: {message}\n", ""), name
    result = run_cli("predict", "junk.onnx", "imgs")
    assert result.code == 2 and result.err.startswith("error: MODEL 'junk.onnx': onnxruntime cannot load it (")
    assert result.err.count("\n") == 1
    Path("empty").mkdir()
    result = run_cli("predict", str(exported / "model.onnx"), "empty")
    assert (result.code, result.err) == (2, "error: IMAGE 'empty': no image files there (looked for .bmp, .gif, "
                                            ".jpeg, .jpg, .pgm, .png, .ppm, .tif, .tiff, .webp)\n")


# Runs `hpsearch predict` in a fresh interpreter and reports whether torch was imported.
PROBE = """
import json, sys
from hpsearch.cli import main
sys.argv = ["hpsearch", "predict", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    code = e.code
else:
    code = 0
print(json.dumps({"code": code, "torch": "torch" in sys.modules}), file=sys.stderr)
"""


def test_predict_on_onnx_does_not_import_torch(exported: Path, tmp_path: Path):
    _write_pngs(tmp_path / "imgs", 2)
    reports = {}
    for model in ("model.onnx", "model.pt"):
        proc = subprocess.run([sys.executable, "-c", PROBE, str(exported / model), "imgs", "--json"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        reports[model] = json.loads(proc.stderr.strip().splitlines()[-1])
        assert len(proc.stdout.splitlines()) == 2
    # TorchScript needs torch (the probe sees it); ONNX runs on numpy, PIL and onnxruntime alone.
    assert reports == {"model.onnx": {"code": 0, "torch": False}, "model.pt": {"code": 0, "torch": True}}


def test_image_suffixes_are_the_folder_datasets(exported: Path):
    assert predicting.IMAGE_SUFFIXES == _readers.IMAGE_SUFFIXES

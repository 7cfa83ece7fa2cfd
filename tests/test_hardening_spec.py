"""Issue #27, items 8 and 9: a study file saved by a Windows editor (BOM, CRLF) loads; a per-layer key's base name
in an [[enqueue]] row sets every layer, as it does in [space], instead of being silently dropped."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from hpsearch._errors import SpecError
from hpsearch.spec import load_spec
from tests.conftest import TINY_SPACE, study_text

# channels may be 6 here (TINY_SPACE's [4, 8] would refuse it).
SPACE = TINY_SPACE.replace("channels = [4, 8]", "channels = [4, 6, 8]")


def test_bom_and_crlf_study_file_loads(tmp_path: Path):
    text = study_text(space=SPACE) + "\n[[enqueue]]\nconv_layers = 2\nchannels_0 = 6\n"
    plain = tmp_path / "plain.toml"
    plain.write_text(text, encoding="utf-8")
    windows = tmp_path / "windows.toml"
    windows.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
    spec = load_spec(windows)
    assert spec.name == "tiny" and spec.epochs == 2
    assert spec.to_dict() == load_spec(plain).to_dict()
    # A bad value in such a file is still the usual one-line error, not a decoding or TOML complaint.
    windows.write_bytes(b"\xef\xbb\xbf" + text.replace("epochs = 2", "epochs = 0").replace("\n", "\r\n").encode())
    with pytest.raises(SpecError, match=r"windows\.toml: epochs = 0 must be an integer >= 1"):
        load_spec(windows)


def test_enqueue_base_name_sets_every_layer_of_the_enqueued_trial(run_cli, write_study, tmp_path: Path):
    path = write_study(text=study_text(epochs=1, n_trials=1, space=SPACE)
                       + "\n[[enqueue]]\nconv_layers = 2\nchannels = 6\n")
    result = run_cli("run", str(path))
    assert result.code == 0, result
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'hpsearch.db'}")
    [trial] = study.trials
    assert trial.params["conv_layers"] == 2
    assert (trial.params["channels_0"], trial.params["channels_1"]) == (6, 6)


def test_enqueue_base_name_rules(write_study):
    base = study_text(space=SPACE) + "\n[[enqueue]]\n"
    # The row fixes conv_layers: that many copies; an explicit copy wins whatever its place in the row.
    row = load_spec(write_study(text=base + "channels_1 = 4\nconv_layers = 2\nchannels = 6\n")).enqueue[0]
    assert row == {"channels_1": 4, "conv_layers": 2, "channels_0": 6}
    # The row leaves conv_layers to the sampler: every layer the space allows (here at most 2).
    row = load_spec(write_study(text=base + "channels = 8\nlabel = \"x\"\n")).enqueue[0]
    assert row == {"channels_0": 8, "channels_1": 8, "label": "x"}
    # fc_width follows fc_layers the same way.
    row = load_spec(write_study(text=base + "fc_layers = 2\nfc_width = 32\n")).enqueue[0]
    assert row == {"fc_layers": 2, "fc_width_0": 32, "fc_width_1": 32}
    # A bad base value names the row and the key; an unknown key lists what is allowed.
    with pytest.raises(SpecError, match=r"study\.toml: enqueue\[0\]\.channels = 5 is outside this study's space "
                                        r"for 'channels': \[4, 6, 8\]$"):
        load_spec(write_study(text=base + "conv_layers = 2\nchannels = 5\n"))
    bad = write_study(text=base + "layers = 2\n")
    with pytest.raises(SpecError) as e:
        load_spec(bad)
    message = str(e.value)
    assert message.startswith(f"{bad}: enqueue[0].layers = 2 is not a parameter of this strategy; allowed: "), message
    assert "channels (or channels_<i>)" in message and message.endswith("label, paper_accuracy")
    assert "\n" not in message

"""benchmarks/cells.py: a resumed study does not recompute a measured cell and refuses a changed protocol."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from cells import Cells  # noqa: E402


def test_a_resumed_cell_is_not_recomputed(tmp_path):
    calls = []
    first = Cells(tmp_path / "r.json", {"epochs": 1})
    assert first.run(("resnet20", 0, "lamp", 0.9), lambda: calls.append(1) or {"test": 0.91}) == {"test": 0.91}
    again = Cells(tmp_path / "r.json", {"epochs": 1})  # a new run over the same file
    assert again.run(("resnet20", 0, "lamp", 0.9), lambda: calls.append(2) or {"test": 0.5}) == {"test": 0.91}
    again.run(("resnet20", 1, "lamp", 0.9), lambda: calls.append(3) or {"test": 0.92})
    assert calls == [1, 3] and again.computed == 1
    assert ("resnet20", 1, "lamp", 0.9) in Cells(tmp_path / "r.json", {"epochs": 1})


def test_another_protocol_is_refused(tmp_path):
    Cells(tmp_path / "r.json", {"epochs": 1}).run(("m", 0), lambda: 1)
    with pytest.raises(ValueError, match="another protocol"):
        Cells(tmp_path / "r.json", {"epochs": 2})


def test_channel_runs_sharing_a_folder_keep_each_others_cells(tmp_path):
    """benchmarks/channel.py: a run writes its cells with those another run (other seeds) wrote meanwhile,
    and keeps writing the cells it adds later through the references it holds."""
    import json

    import channel  # benchmarks/ is on the path above, as for `cells`
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"models": {"m": {"levels": {"0.5": {"l1": {"2": {"test": 0.8}}}}}}}))  # the other run
    mine = {"models": {"m": {"levels": {"0.5": {"l1": {"0": {"test": 0.9}}}}}}}
    rows = mine["models"]["m"]["levels"]["0.5"]  # the run's loop holds this
    channel.save(path, mine)
    rows["tp"] = {"0": {"test": 0.7}}
    channel.save(path, mine)
    got = json.loads(path.read_text())["models"]["m"]["levels"]["0.5"]
    assert got == {"l1": {"0": {"test": 0.9}, "2": {"test": 0.8}}, "tp": {"0": {"test": 0.7}}}


def test_runs_sharing_a_file_keep_each_others_cells(tmp_path):
    """Two runs of one study (say seeds 0-1 and seed 2) side by side on the same cells file."""
    a = Cells(tmp_path / "r.json", {"epochs": 1})
    b = Cells(tmp_path / "r.json", {"epochs": 1})  # opened before a wrote anything
    a.run(("m", 0, "lamp"), lambda: {"test": 0.9})
    b.run(("m", 2, "lamp"), lambda: {"test": 0.8})
    a.run(("m", 1, "lamp"), lambda: {"test": 0.7})
    on_disk = Cells(tmp_path / "r.json", {"epochs": 1})
    assert {k: on_disk.get(k) for k in [("m", 0, "lamp"), ("m", 1, "lamp"), ("m", 2, "lamp")]} == {
        ("m", 0, "lamp"): {"test": 0.9}, ("m", 1, "lamp"): {"test": 0.7}, ("m", 2, "lamp"): {"test": 0.8}}
    assert ("m", 2, "lamp") in a  # a learnt b's cell when it saved: it will not recompute it


def test_the_selection_summary_covers_the_cells_of_every_run(tmp_path):
    """benchmarks/selection.py: runs over different seeds share one file; the summary any of them writes (or
    ``--summary-only``) covers every stored cell, not the seeds and rungs of the run that wrote it last."""
    import selection
    path = tmp_path / "cells.json"
    a, b = Cells(path, {"epochs": 1}), Cells(path, {"epochs": 1})
    a.run(("resnet20", 0, "lamp", 0.9), lambda: {"test": 0.9, "wall_seconds": 1.0})
    b.run(("resnet20", 2, "lamp", 0.95), lambda: {"test": 0.8, "wall_seconds": 1.0})
    whole = Cells.stored(path)
    assert selection.stored(whole) == (["resnet20"], [0, 2], [0.9, 0.95])
    assert "| lamp | 90.00 (1) | 80.00 (1) |" in selection.table(whole, *selection.stored(whole))
    with pytest.raises(FileNotFoundError, match="no cells stored"):
        Cells.stored(tmp_path / "none.json")

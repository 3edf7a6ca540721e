"""benchmarks/references.py: the converged references ship with the repository, and a results file records
which weights its cells came from, so cells from other weights are refused instead of resumed or paired."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import references as refs  # noqa: E402

from de_plugin.demo.models import create_model  # noqa: E402


def _git(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def test_reference_weights_are_not_git_ignored():
    for name in refs.RECIPES:
        path = f"benchmarks/references/{refs.tag(name)}.pt"
        assert _git("check-ignore", "-q", path).returncode == 1, (
            f"{path} is git-ignored: a clean clone would lack the weights every converged-reference study starts from")


def test_every_shipped_manifest_entry_is_a_tracked_file():
    manifest = json.loads((refs.SHIPPED / "manifest.json").read_text())
    tracked = set(_git("ls-files", "benchmarks/references").stdout.split())
    for name, entry in manifest.items():
        assert f"benchmarks/references/{entry['file']}" in tracked, (
            f"manifest.json lists {name}'s {entry['file']}, which the repository does not hold")


def test_cells_from_other_weights_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(refs, "SHIPPED", tmp_path)
    monkeypatch.setattr(refs, "CACHE", tmp_path / "cache")
    torch.manual_seed(0)
    model = create_model("lenet300")
    refs.save_reference("lenet300", model, {"test": 0.5}, tmp_path)
    first = refs.identity("lenet300")
    results = tmp_path / "results.json"
    saved = refs.check_weights(results, {}, ["lenet300"])
    assert saved == {"lenet300": first}
    assert refs.check_weights(results, saved, ["lenet300"]) == saved  # the same weights: resumed

    with torch.no_grad():  # retrained elsewhere: same recipe, so the same file name, other weights
        next(model.parameters()).add_(1e-3)
    refs.save_reference("lenet300", model, {"test": 0.5}, tmp_path)
    second = refs.identity("lenet300")
    assert second.split("@")[0] == first.split("@")[0] and second != first
    with pytest.raises(ValueError, match="another protocol") as err:
        refs.check_weights(results, saved, ["lenet300"])
    assert first in str(err.value) and second in str(err.value)


def test_deep_rows_from_other_weights_are_not_merged():
    import deep

    def run(identity: str) -> dict:
        return {"ladder": [0.9], "epochs_per_rung": 1, "train_images": 55000, "models": {},
                "weights": {"resnet20": identity}}

    into = run("resnet20_x@aaaaaaaaaaaa")
    deep.merge(into, run("resnet20_x@aaaaaaaaaaaa"))
    with pytest.raises(ValueError, match="other reference weights"):
        deep.merge(into, run("resnet20_x@bbbbbbbbbbbb"))


def _tiny_run(checkpoint, stop_at=None):
    """A small conv net trained 10 steps with augmentation (both random streams in play); ``stop_at``
    interrupts the run after that step, as a stopped sitting would."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 8 * 8, 3))
    x, y = torch.randn(48, 1, 8, 8), torch.randint(0, 3, (48,))
    recipe = {"opt": "sgd", "lr": 0.05, "wd": 1e-4, "batch": 16, "augment": True}

    def interrupt(step):
        if step == stop_at:
            raise KeyboardInterrupt

    torch.manual_seed(1)  # the augmentation's stream, as the reference's seed leaves it
    refs.train_steps(model, x, y, 10, recipe, seed=3, on_step=interrupt, checkpoint=checkpoint, checkpoint_every=4)
    return model


def test_a_stopped_reference_run_resumes_to_the_uninterrupted_weights(tmp_path):
    whole = _tiny_run(None)
    ckpt = tmp_path / "run.partial.pt"
    with pytest.raises(KeyboardInterrupt):
        _tiny_run(ckpt, stop_at=9)  # checkpointed at step 8, inside the third three-batch epoch
    assert ckpt.exists()
    resumed = _tiny_run(ckpt)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    ckpt = tmp_path / "run.partial.pt"
    with pytest.raises(KeyboardInterrupt):
        _tiny_run(ckpt, stop_at=4)
    model = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match="delete it"):
        refs.train_steps(model, torch.randn(32, 4), torch.randint(0, 3, (32,)), 20,
                         {"opt": "sgd", "lr": 0.1, "wd": 0.0, "batch": 8}, seed=0, checkpoint=ckpt)

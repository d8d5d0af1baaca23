"""The benchmark's default evaluation set: drawn once, redrawn when the generator changed, read as it is without it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench import evalset
from qd_core.data import synthetic


def test_default_set_is_drawn_once_and_redrawn_for_a_newer_generator(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evalset, "DEFAULT_ROOT", tmp_path / "bench-synthetic")
    root = evalset.ensure_default_root(7)
    assert root == tmp_path / "bench-synthetic-1" and (root / "manifest.json").is_file()
    manifest = json.loads((root / "manifest.json").read_text())
    stale = {**manifest, "version": synthetic.GENERATOR_VERSION - 1}
    (root / "manifest.json").write_text(json.dumps(stale))
    assert evalset.ensure_default_root(7) == root
    assert json.loads((root / "manifest.json").read_text())["version"] == synthetic.GENERATOR_VERSION

    # Without the generator's dependencies a finished folder is still used, whatever version drew it.
    (root / "manifest.json").write_text(json.dumps(stale))
    monkeypatch.setitem(sys.modules, "qd_core.data.synthetic", None)
    assert evalset.ensure_default_root(7) == root
    assert json.loads((root / "manifest.json").read_text())["version"] == synthetic.GENERATOR_VERSION - 1
    with pytest.raises(ImportError):
        evalset.ensure_default_root(20)  # nothing drawn for 3 scenes per domain, and nothing to draw it with


def test_a_folder_in_neither_layout_names_it_and_both_layouts(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        evalset.load_eval_set(tmp_path, 1, (64, 64))
    message = str(caught.value)
    assert message.startswith(f"{tmp_path}: expected a synthetic root (manifest.json) or a Cityscapes-layout folder")
    assert "leftImg8bit" in message and "\n" not in message


@pytest.mark.parametrize("manifest, needle", [("{not json", "cannot read the synthetic set's manifest"),
                                              ('{"target_domains": "fog"}', "'target_domains' is a list")])
def test_an_unreadable_manifest_is_named(manifest: str, needle: str, tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(manifest)
    with pytest.raises(ValueError, match=needle) as caught:
        evalset.load_eval_set(tmp_path, 1, (64, 64))
    assert str(caught.value).startswith(str(tmp_path / "manifest.json"))

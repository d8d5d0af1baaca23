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

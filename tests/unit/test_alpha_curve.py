"""tools/alpha_curve.py: which checkpoints of a training run it evaluates, in which order."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "tools" / "alpha_curve.py"
_spec = importlib.util.spec_from_file_location("alpha_curve", _PATH)
alpha_curve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(alpha_curve)


def test_snapshots_in_step_order_then_final(tmp_path):
    for step in (1000, 200, 30):
        (tmp_path / "snapshots" / f"step_{step}").mkdir(parents=True)
    assert [p.name for p in alpha_curve.checkpoints(tmp_path)] == ["step_30", "step_200", "step_1000"]
    (tmp_path / "final").mkdir()
    assert alpha_curve.checkpoints(tmp_path)[-1].name == "step_1000"  # final/ without a PDM is skipped
    (tmp_path / "final" / "pdm_config.json").write_text("{}")
    assert alpha_curve.checkpoints(tmp_path)[-1].name == "final"


def test_no_checkpoints_is_a_one_line_error(tmp_path, capsys):
    assert alpha_curve.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: no checkpoints found")

"""The end-of-run stats table fits the terminal: the full layout when it fits, else a compact one."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from spd_megatron.metrics import DecodeStats
from spd_megatron.report import print_stats_table, result_record

TITLE = "spd | TP=1 PP=2 | smollm2-135m-instruct-float32 float32"


def records(speculative: bool) -> list[dict]:
    stats = DecodeStats(prompt_tokens=50, new_tokens=128, cycles=300, pipeline_depth=2, rollbacks=12,
                        verified=140 if speculative else 0, accepted=33 if speculative else 0,
                        prefill_seconds=1.25, decode_seconds=12.5, stage_compute_seconds=8.0,
                        draft_seconds=2.0, comm_wait_seconds=3.5, stop_reason="max_new_tokens")
    return [result_record("p", [1] * 50, [2] * 128, "t", stats) for _ in range(3)]


def render(width: int, speculative: bool) -> list[str]:
    out = io.StringIO()
    print_stats_table(records(speculative), TITLE, Console(file=out, width=width, force_terminal=False))
    return out.getvalue().splitlines()


@pytest.mark.parametrize("speculative", [False, True])
@pytest.mark.parametrize("width", [80, 120, 170])
def test_table_fits_the_width(width, speculative):
    lines = render(width, speculative)
    assert max(len(line) for line in lines) <= width
    text = "\n".join(lines)
    assert "max_new_tokens" in text and "10.2" in text  # stop reason and decode tok/s, unwrapped
    if speculative:
        assert "0.236" in text and "alpha" in text  # acceptance 33/140


def test_full_layout_when_wide_compact_when_narrow():
    wide, narrow = "\n".join(render(170, True)), "\n".join(render(80, True))
    assert "prompt tok" in wide and "rollbacks" in wide and "wait s" in wide
    assert "prompt tok" not in narrow and "rollbacks" not in narrow and "E" in narrow

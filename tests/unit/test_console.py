"""Start-up output: the known-harmless third-party warnings are hidden by default, shown with info."""

from __future__ import annotations

import logging
import warnings

from spd_megatron.console import configure_output, level_from_argv

TE_WARNING = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."


def _shown(message: str, category=UserWarning) -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn(message, category)
    return bool(caught)


def test_harmless_warnings_hidden_by_default_and_shown_with_info(monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")  # configure_output("info") changes it
    hf_level = hf_logging.get_verbosity()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            configure_output("warning")
            assert not _shown(TE_WARNING) and not _shown("full scope is deprecated. Use empty cuda_graph_scope")
            assert _shown("something else went wrong")  # only the listed messages
            assert _shown(TE_WARNING, DeprecationWarning)  # and only in their category
            configure_output("info")
            assert _shown(TE_WARNING) and root.level == logging.INFO
    finally:
        hf_logging.set_verbosity(hf_level)
        root.setLevel(level)
        root.handlers[:] = handlers


def test_level_from_the_command_line():
    assert level_from_argv(["max_new_tokens=8"], verbose=False) == "warning"
    assert level_from_argv(["log_level=debug"], verbose=False) == "debug"
    assert level_from_argv([], verbose=True) == "info"

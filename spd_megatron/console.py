"""What a run prints besides its results: the log level, the third-party warnings it hides.

The warnings below say nothing a user can act on in a supported setup (megatron-core on a machine
without Transformer Engine or Apex, which our local and lean specs do not need). They are filtered
here, and only here, by category and message; ``log_level=info`` (or ``--verbose``) shows them again.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

HARMLESS_WARNINGS = (  # (category, message regex matched at the start), and who emits it
    (UserWarning, r"Transformer Engine and Apex are not installed"),  # megatron.core imports on CPU
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm"),  # megatron's local layer spec
    (UserWarning, r"full scope is deprecated"),  # megatron TransformerConfig's default cuda_graph_scope
)
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def configure_output(log_level: str = "warning") -> None:
    """Set the root log level; at warning and above, hide HARMLESS_WARNINGS (callable again)."""
    level = getattr(logging, log_level.upper())
    logging.basicConfig(level=level, format=LOG_FORMAT, force=True)
    action = "ignore" if level >= logging.WARNING else "default"
    for category, message in HARMLESS_WARNINGS:
        warnings.filterwarnings(action, message=message, category=category)  # the newest filter wins
    if level < logging.WARNING:
        os.environ["TRANSFORMERS_VERBOSITY"] = log_level  # read when transformers is imported
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity(level)


def level_from_argv(overrides, verbose: bool) -> str:
    """The log level asked for on the command line, before the config is parsed (imports follow)."""
    if verbose:
        return "info"
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("log_level=")]
    return given[-1] if given and given[-1] in ("debug", "info", "warning", "error") else "warning"

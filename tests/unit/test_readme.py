"""README starts with the two commands a new user types; CI runs the second one verbatim."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    lines = ROOT.joinpath("README.md").read_text().splitlines()
    block = lines[lines.index("```bash") + 1:]
    return [line for line in block[:block.index("```")] if line and not line.startswith("#")]


def test_readme_starts_with_two_commands():
    first, second = readme_commands()[:2]
    assert "torchrun --nproc-per-node 2 examples/decode.py" in first and "pip install" in first
    assert "pytest" in second and "pip install" in second
    assert "torch==2.13.0" in first and "torch==2.13.0" in second  # never a CUDA torch on CPU


def test_ci_runs_the_readme_test_command():
    assert readme_commands()[1] in ROOT.joinpath(".ci", "run").read_text()

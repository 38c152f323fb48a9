"""The design's rules, checked: layers (import-linter) and "one concern, one place".

Every entry point runs the same code for the same step; these tests find the product code that
calls a step's building blocks directly instead of the one function that owns the step.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("speech", "serve", "pipelines", "db", "config")


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def _calls(name: str) -> dict[str, int]:
    """Product modules calling `name` (as a function or a method), with their call counts."""
    found: dict[str, int] = {}
    for package in PRODUCT:
        for path in (REPO / package).rglob("*.py"):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called == name:
                    rel = str(path.relative_to(REPO))
                    found[rel] = found.get(rel, 0) + 1
    return found


def _definitions(name: str) -> list[str]:
    out = []
    for package in PRODUCT:
        for path in (REPO / package).rglob("*.py"):
            tree = ast.parse(path.read_text(), filename=str(path))
            out += [f"{path.relative_to(REPO)}:{n.lineno}" for n in ast.walk(tree)
                    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name]
    return out


@pytest.mark.parametrize(("step", "owners", "building_block"), [
    ("decode with the size and duration limits", {"speech/audio.py"}, "decode_audio"),
    ("speakers merged into the transcript", {"speech/pipeline.py"}, "assign_speakers"),
    # the engine's ASR-only `transcribe` (tests, benchmarks) stitches too
    ("windows stitched into a transcript", {"speech/pipeline.py", "speech/asr.py"}, "stitch"),
    ("speaker hints validated", {"speech/request.py", "speech/diarization/engine.py"}, "validate_hints"),
])
def test_each_step_has_one_owner(step: str, owners: set[str], building_block: str) -> None:
    others = set(_calls(building_block)) - owners
    assert not others, f"{step}: only {sorted(owners)} may call {building_block}(); also: {sorted(others)}"


@pytest.mark.parametrize("name", ["check_request", "validate_hints", "load_audio", "assemble",
                                  "parse_params", "call_handle"])
def test_each_shared_step_is_defined_once(name: str) -> None:
    assert len(_definitions(name)) == 1, _definitions(name)


def test_entry_points_validate_through_speech() -> None:
    """The option rules live in speech.request; entry points call check_request, directly or
    through the pipeline, and keep no rules of their own."""
    assert _calls("check_request"), "nobody validates"
    for module in ("serve/jobs_api.py", "serve/job_runner.py", "pipelines/batch_transcribe.py"):
        text = (REPO / module).read_text()
        assert "LANGUAGE_NAMES" not in text and "MAX_SPEAKERS" not in text, module


def test_product_code_ships_no_fake_engine() -> None:
    """Issue 13 bug 8: `--engine noop` marked real jobs succeeded with empty transcripts. Fakes
    live in tests (tests/fakes.py); the runner has no switch to pick one."""
    from serve.job_runner import main

    with pytest.raises(SystemExit) as refused:
        main(["--engine", "noop"])
    assert refused.value.code == 2
    for package in PRODUCT:
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text().lower()
            assert "noop" not in text and "fake engine" not in text, path

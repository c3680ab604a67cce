"""The fault list of ``scripts/fault_check.py`` against the current code."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fault_check(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("fault_check", ROOT / "scripts" / "fault_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_fault_edits_exactly_one_place_of_the_current_code(fault_check: ModuleType) -> None:
    """Each injected fault must still find the text it replaces, once: a refactor that moves it
    would otherwise leave the fault check testing nothing."""
    names = [fault.name for fault in fault_check.FAULTS]
    assert len(names) == len(set(names)), "two faults share a name"
    for fault in fault_check.FAULTS:
        text = (ROOT / fault_check.SRC / fault.path).read_text()
        assert text.count(fault.old) == 1, f"{fault.name}: the text to replace occurs {text.count(fault.old)} times in {fault.path}"
        assert fault.new != fault.old and fault.what, f"{fault.name}: no change or no description"


def test_every_hint_names_a_fault_and_a_test_file(fault_check: ModuleType) -> None:
    """The hints only reorder the suite, but one naming a removed fault or file is stale data."""
    names = {fault.name for fault in fault_check.FAULTS}
    for name, node in fault_check.read_hints().items():
        assert name in names, f"hint for an unknown fault {name!r}"
        assert (ROOT / node.split("::", 1)[0]).is_file(), f"{name}: {node} names no test file"


def test_the_catching_test_is_read_from_pytests_summary_line(fault_check: ModuleType) -> None:
    line = "FAILED tests/test_bad_input.py::test_bad_batch[wrong image size] - Failed: DID NOT RAISE <class 'ValueError'>"
    assert fault_check.failed_node(line) == "tests/test_bad_input.py::test_bad_batch[wrong image size]"
    assert fault_check.failed_node("ERROR tests/test_cli.py - ImportError: cannot import name") == "tests/test_cli.py"
    assert fault_check.failed_node("3 passed in 1.20s") is None


def test_a_suite_that_does_not_collect_unfaulted_runs_no_fault(fault_check: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture) -> None:
    """Run without the project's packages, every fault's pytest failed at its imports, and each was
    counted as caught. The collection of the unfaulted suite is checked first."""
    broken = "ERROR tests/test_cli.py - ModuleNotFoundError: No module named 'pytorch_lightning'"

    def collect(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert "--collect-only" in command, command
        return subprocess.CompletedProcess(command, 2, stdout=f"{broken}\n1 error in 0.50s\n", stderr="")

    def no_fault(*args: object, **kwargs: object) -> None:
        raise AssertionError("a fault was run")

    monkeypatch.setattr(fault_check.subprocess, "run", collect)
    monkeypatch.setattr(fault_check, "run_fault", no_fault)
    assert fault_check.main(["usage_buries_the_error"]) == 2
    assert broken in capsys.readouterr().out

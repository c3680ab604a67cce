"""The fault list of ``scripts/fault_check.py`` against the current code."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_fault_edits_exactly_one_place_of_the_current_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each injected fault must still find the text it replaces, once: a refactor that moves it
    would otherwise leave the fault check testing nothing."""
    spec = importlib.util.spec_from_file_location("fault_check", ROOT / "scripts" / "fault_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    names = [fault.name for fault in module.FAULTS]
    assert len(names) == len(set(names)), "two faults share a name"
    for fault in module.FAULTS:
        text = (ROOT / module.SRC / fault.path).read_text()
        assert text.count(fault.old) == 1, f"{fault.name}: the text to replace occurs {text.count(fault.old)} times in {fault.path}"
        assert fault.new != fault.old and fault.what, f"{fault.name}: no change or no description"

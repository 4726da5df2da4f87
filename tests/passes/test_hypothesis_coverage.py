"""Every pass has a property test: a file beside its tests that draws inputs with hypothesis.

A pass is a ``class X(Pass)`` in a module of ``passes/`` or ``passes/xnnpack/``; its property
test is ``tests/passes/<same subfolder>/test_<module>*.py`` holding ``@given`` and naming ``X``.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PASS_CLASS = re.compile(r"^class (\w+)\(Pass\):", re.MULTILINE)


def passes_by_module() -> dict[Path, list[str]]:
    """``{passes/<sub>/<module>.py relative to the repository: [pass class names]}``."""
    found = {}
    for path in sorted((ROOT / "passes").rglob("*.py")):
        names = PASS_CLASS.findall(path.read_text())
        if names:
            found[path.relative_to(ROOT)] = names
    return found


def property_tests(module: Path, name: str) -> list[str]:
    """Test files beside ``module``'s tests with ``@given`` that name the pass ``name``."""
    folder = ROOT / "tests" / module.parent
    return [p.name for p in sorted(folder.glob(f"test_{module.stem}*.py"))
            if "@given" in (text := p.read_text()) and name in text]


def test_every_pass_has_a_hypothesis_test():
    found = passes_by_module()
    assert len(found) >= 12, found  # 6 in passes/, 6 in passes/xnnpack/ today: the scan sees them
    missing = [f"{module}: {name}" for module, names in found.items() for name in names
               if not property_tests(module, name)]
    assert missing == [], f"passes without a hypothesis test beside their tests: {missing}"


def test_every_pass_is_exported_by_fxport_passes():
    import fxport.passes as passes

    names = [name for names in passes_by_module().values() for name in names]
    assert sorted(set(names) - set(passes.__all__)) == []

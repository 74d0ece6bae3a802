"""The architecture document names every product module, so a new one cannot go unexplained."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("orchcore", "orchestrator", "worker")
GENERATED = ("worker_pb2.py", "worker_pb2_grpc.py")


def product_modules() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "__init__.py" or path.name in GENERATED:
                continue
            found.append(path.relative_to(ROOT).as_posix())
    return found


def test_every_product_module_is_in_the_architecture_document():
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = [m for m in product_modules() if f"`{m}`" not in text]
    assert not missing, f"docs/architecture.md does not describe: {', '.join(missing)}"


def test_the_document_names_no_module_that_is_gone():
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:orchcore|orchestrator|worker)/[\w/]+\.py)`", text))
    gone = sorted(named - set(product_modules()) - {f"orchcore/wire/{g}" for g in GENERATED})
    assert not gone, f"docs/architecture.md names modules that do not exist: {', '.join(gone)}"

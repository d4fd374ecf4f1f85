"""The layering ARCHITECTURE.md describes, checked on the source: who may import whom."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "wanda_kernels"
# The kernel layer: everything but the whole-model subpackage, the oracle and the two
# entry points (the package's __init__ re-exports prune_model; __main__ runs the CLI).
KERNEL_LAYER = [p for p in PACKAGE.rglob("*.py") if "llm" not in p.relative_to(PACKAGE).parts
                and p.relative_to(PACKAGE).as_posix() not in ("reference.py", "__main__.py", "__init__.py")]


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the wanda_kernels modules ``path`` imports (relative imports resolved)."""
    parts = list(path.relative_to(PACKAGE.parent).parts[:-1])  # the package the file is in
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[: len(parts) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n == "wanda_kernels" or n.startswith("wanda_kernels.")}


def test_the_scan_sees_relative_imports():
    # A check that cannot fail is no check: the scan must resolve the package's own imports.
    assert "wanda_kernels._layout24" in _imported_modules(PACKAGE / "sparse24.py")
    assert "wanda_kernels.gemm24.policy" in _imported_modules(PACKAGE / "gemm24" / "launch.py")
    assert "wanda_kernels.norms" in _imported_modules(PACKAGE / "llm" / "pipeline.py")
    assert "wanda_kernels._layout24" in _imported_modules(PACKAGE / "reference.py")


@pytest.mark.parametrize("path", sorted(p for p in PACKAGE.rglob("*.py") if p.name != "reference.py"),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_product_module_imports_the_oracle(path):
    assert "wanda_kernels.reference" not in _imported_modules(path)


def test_the_oracle_imports_only_shared_definitions():
    imported = {m for m in _imported_modules(PACKAGE / "reference.py") if m.count(".") == 1}
    assert imported <= {"wanda_kernels._layout24", "wanda_kernels._validation"}, imported


@pytest.mark.parametrize("path", KERNEL_LAYER, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_kernel_layer_does_not_import_the_llm_layer(path):
    assert not any(m.startswith("wanda_kernels.llm") for m in _imported_modules(path))


def test_import_loads_neither_oracle_nor_extension_nor_triton():
    code = ("import sys, wanda_kernels; "
            "print(sorted(m for m in ('wanda_kernels.reference', 'wanda_kernels._C', 'triton', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

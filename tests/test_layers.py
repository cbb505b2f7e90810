"""Who may import whom, read from the source (every import, also those inside functions).

flows (engine, CLI) -> components/<kind> (one step kind each) -> components/lib (shared) -> schemas
- a step kind imports the library, never another step kind (its own package's modules are its own);
- the library imports no step kind and no step spec (`schemas.steps`): explicit arguments only;
- schemas import nothing from components or flows (and no torch, MLflow or Prefect: test_json_schema);
- the engine loads step kinds by name (importlib), never by a static import, except its preload list.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = sorted(p.stem for p in (REPO / "components").iterdir()
               if p.name not in ("__init__.py", "lib", "__pycache__") and (p.suffix == ".py" or p.is_dir()))


def imports(path: Path) -> set[str]:
    """Every module a file imports, relative imports resolved."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from components import tasks`
    return found


def kind_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "components" and parts[1] in KINDS else None


def files(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def test_there_are_step_kinds_and_a_library():
    assert {"tokenize", "pretrain", "evaluate", "finetune", "ppo"} <= set(KINDS)
    assert (REPO / "components" / "lib" / "__init__.py").is_file()


def test_a_step_kind_imports_the_library_never_another_kind():
    wrong = []
    for path in files("components"):
        own = path.relative_to(REPO / "components").parts[0].removesuffix(".py")
        if own in ("lib", "__init__"):
            continue
        wrong += [f"{path.relative_to(REPO)} imports {m}" for m in imports(path) if kind_of(m) not in (None, own)]
    assert not wrong, "\n".join(wrong)


def test_the_library_imports_no_step_kind_and_no_step_spec():
    wrong = []
    for path in files("components/lib"):
        wrong += [f"{path.relative_to(REPO)} imports {m}" for m in imports(path)
                  if kind_of(m) or m.startswith("schemas.steps") or m.startswith("flows")]
    assert not wrong, "\n".join(wrong)


def test_schemas_import_nothing_from_components_or_flows():
    wrong = [f"{p.relative_to(REPO)} imports {m}" for p in files("schemas") for m in imports(p)
             if m.split(".")[0] in ("components", "flows")]
    assert not wrong, "\n".join(wrong)


def test_the_engine_loads_kinds_by_name_only():
    wrong = [f"{p.relative_to(REPO)} imports {m}" for p in files("flows") for m in imports(p)
             if kind_of(m) and p.name != "preload.py"]
    assert not wrong, "\n".join(wrong)

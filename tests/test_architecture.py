"""The package's shape: stages side by side over a shared layer (see docs and distill/stages/__init__.py).

Reads the import graph of distill/ from the source (every import, at the top or inside a function) and
fails when a stage module imports another stage module, or when the shared layer reaches up into the
stages: only the top (cli, pipeline) chains stages.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distill"
TOP = {"distill.cli", "distill.pipeline", "distill.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every distill module `path` imports, anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("distill")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distill"):
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}  # `from distill.stages import train`
    return names


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules} for name, path in modules.items()}


def is_stage(name: str) -> bool:
    return name.startswith("distill.stages.")


def test_no_stage_module_imports_another_stage_module():
    crossings = sorted(
        f"{name} imports {dep}"
        for name, deps in graph().items()
        if is_stage(name)
        for dep in deps
        if is_stage(dep) and dep != name
    )
    assert crossings == [], "stages must not import each other:\n" + "\n".join(crossings)


def test_the_shared_layer_never_imports_a_stage():
    upward = sorted(
        f"{name} imports {dep}"
        for name, deps in graph().items()
        if not is_stage(name) and name not in TOP
        for dep in deps
        if is_stage(dep)
    )
    assert upward == [], "only cli and pipeline chain stages:\n" + "\n".join(upward)


def test_the_graph_reader_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from distill.stages.train import x\n    import distill.store\n")
    assert {"distill.stages.train", "distill.store"} <= imports(source)


def test_every_stage_is_its_own_module():
    stages = sorted(module_name(p) for p in (PACKAGE / "stages").glob("*.py") if p.name != "__init__.py")
    assert stages == [f"distill.stages.{s}" for s in sorted(
        ["prepare", "pretrain", "generate", "train", "quantize", "evaluate", "bench", "report", "promote", "serve"]
    )]  # fmt: skip

"""One record per model family (impq.families): every record is complete, and no module outside the records names
a family (so adding a family is adding a record)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import impq
from impq.families import TEXT_FAMILIES, VISION_FAMILIES, check_records

PACKAGE = Path(impq.__file__).parent
# strings equal to a family's name that name something else: llama.cpp's own vocabulary and pre-tokenizer names,
# the runner's llama_cpp.Llama attribute
NOT_FAMILIES = {("export/gguf_text.py", "llama"), ("export/gguf_text.py", "qwen2"), ("runtime/llamacpp.py", "llama")}


def test_every_record_is_complete():
    assert check_records() == []


def test_a_record_missing_a_field_is_reported(monkeypatch):
    import dataclasses

    broken = dataclasses.replace(TEXT_FAMILIES["qwen2"], awq_groups=(), imp_architecture=None)
    monkeypatch.setitem(TEXT_FAMILIES, "qwen2", broken)
    problems = check_records()
    assert any("no AWQ scale groups" in p for p in problems)
    assert any("imp_model_types and imp_architecture" in p for p in problems)


def _string_literals(tree: ast.AST) -> list[tuple[int, str]]:
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


def test_no_module_outside_the_records_names_a_family():
    names = set(TEXT_FAMILIES) | set(VISION_FAMILIES)
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("families/"):
            continue
        for line, value in _string_literals(ast.parse(path.read_text(encoding="utf-8"))):
            if value in names and (relative, value) not in NOT_FAMILIES:
                found.append(f"{relative}:{line}: {value!r}")
    assert found == []


@pytest.mark.parametrize("name", sorted(TEXT_FAMILIES))
def test_each_text_family_builds_and_reads_back_its_test_checkpoints(name, models_dir):
    from impq.models.layouts import read_spec

    family = TEXT_FAMILIES[name]
    assert family.test_checkpoints
    for checkpoint in family.test_checkpoints:
        spec = read_spec(models_dir / checkpoint.name)
        assert spec.text_family is family and spec.vision.family is VISION_FAMILIES[checkpoint.vision]
        assert spec.layout == checkpoint.naming
        assert isinstance(spec.text_config, family.config_class)

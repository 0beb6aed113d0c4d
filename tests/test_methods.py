"""The method contract: one registry of typed methods for every kind, validated when a scenario loads, and a
package without import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pydantic
import pytest
import yaml

from safeedit.errors import SafeEditError
from safeedit.methods import KINDS, EditResult, get_method, methods, register_method, resolve
from safeedit.runners import RUNNERS
from safeedit.scenario import KINDS as SCENARIO_KINDS
from safeedit.scenario import load_scenario

PACKAGE = Path(__file__).resolve().parent.parent / "safeedit"


def test_every_method_of_every_kind_declares_what_the_report_needs():
    for kind in KINDS:
        assert methods(kind), kind
        for name, spec in methods(kind).items():
            assert spec.kind == kind and spec.name == name
            assert issubclass(spec.options, pydantic.BaseModel)
            assert spec.summary and spec.limitations and spec.paper, (kind, name)


def test_a_method_must_have_the_contract_signature():
    class Options(pydantic.BaseModel):
        pass

    with pytest.raises(TypeError, match="setting, options, seed, progress"):
        register_method("merge", summary="s", limitations="l")(lambda setting, options: EditResult())
    with pytest.raises(TypeError, match="pydantic model"):
        @register_method("merge", summary="s", limitations="l")
        def untyped(setting, options: dict, seed: int, progress: bool) -> EditResult:
            return EditResult()
    assert "untyped" not in methods("merge")


def test_names_resolve_once_with_clear_errors():
    assert resolve("llm-unlearning", "npo+wagle").mask_score == "wagle"
    assert resolve("llm-unlearning", "npo").mask_score is None
    with pytest.raises(SafeEditError, match="unknown mask score 'salency'"):
        resolve("llm-unlearning", "npo+salency")
    with pytest.raises(SafeEditError, match="unknown method 'nop'; choose from"):
        resolve("llm-unlearning", "nop+wagle")
    with pytest.raises(SafeEditError, match="unknown method 'salun2'; choose from ft, ga"):
        get_method("classification", "salun2")


def test_a_misspelt_mask_score_fails_when_the_scenario_loads(tmp_path):
    scenario = {"name": "typo", "request": {"what": "digit 3"}, "model": {"name": "digits-cnn"},
                "data": {"source": "digits"}, "forget": {"kind": "class", "label": 3},
                "methods": {"ft": {"mask_score": "salency"}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(scenario))
    with pytest.raises(SafeEditError, match=r"methods\.ft: mask_score: .*unknown score 'salency'"):
        load_scenario(tmp_path / "s.yaml")


def test_every_scenario_kind_has_one_runner():
    assert set(RUNNERS) == set(SCENARIO_KINDS.values())


def _imports(path: Path) -> set[str]:
    """The safeedit modules a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("safeedit"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("safeedit"))
    return found


def test_no_import_cycle_in_the_package():
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph = {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*trail[trail.index(nxt):], nxt] if nxt in trail else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_benchmarks_use_the_public_runner_api_only():
    """A benchmark builds its setting from the public settings modules and runs jobs through `safeedit.runners`;
    a runner module's own helpers may change with the runner."""
    import safeedit.runners as runners

    for path in sorted((PACKAGE.parent / "benchmarks").glob("*.py")):
        for module in _imports(path):
            if module.startswith("safeedit.runners."):
                assert module.removeprefix("safeedit.runners.") in runners.__all__, (path.name, module)


@pytest.mark.parametrize("kind, name", [("classification", "ft"), ("llm-unlearning", "npo")])
def test_every_mask_option_is_called_ratio_and_the_old_name_still_reads(kind, name):
    spec = get_method(kind, name)
    assert spec.validate({"ratio": 0.25}).ratio == spec.validate({"mask_ratio": 0.25}).ratio == 0.25
    assert "mask_ratio" not in spec.validate({}).model_dump()
    with pytest.raises(SafeEditError, match="ratio"):
        spec.validate({"ratio": 2})


def test_an_llm_objective_takes_only_its_own_options(tmp_path):
    """NPO has β; GradDiff and refusal have none, so a β given to them is a mistake named at load time, while the
    shared `unlearning:` section hands each objective just the options it has."""
    assert "beta" in get_method("llm-unlearning", "npo").options.model_fields
    assert "beta" not in get_method("llm-unlearning", "graddiff").options.model_fields
    scenario = {"name": "s", "kind": "llm-unlearning", "request": {"what": "two capitals"},
                "model": {"name": "m"}, "data": {"protocol": "capitals"},
                "unlearning": {"beta": 0.3}, "methods": {"npo": None, "graddiff+random": None}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(scenario))
    options = load_scenario(tmp_path / "s.yaml").method_options()
    assert options["npo"].beta == 0.3 and not hasattr(options["graddiff+random"], "beta")
    scenario["methods"] = {"graddiff": {"beta": 0.3}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(scenario))
    with pytest.raises(SafeEditError, match=r"methods\.graddiff: beta"):
        load_scenario(tmp_path / "s.yaml")


def test_a_method_override_under_the_old_option_name_replaces_the_shared_default(tmp_path):
    scenario = {"name": "s", "kind": "llm-unlearning", "request": {"what": "two capitals"},
                "model": {"name": "m"}, "data": {"protocol": "capitals"},
                "unlearning": {"ratio": 0.3}, "methods": {"npo+wagle": {"mask_ratio": 0.05}, "npo+random": None}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(scenario))
    options = load_scenario(tmp_path / "s.yaml").method_options()
    assert options["npo+wagle"].ratio == 0.05 and options["npo+random"].ratio == 0.3

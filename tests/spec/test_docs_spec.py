"""docs/spec.md stays in step with the schema: every key documented, nothing documented that is
not a key, every enum value, function, size and limit named, and every spec on the page loads."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

import attncc
from attncc.spec import expr, schema
from attncc.spec.symbols import SIZE_NAMES
from attncc.testing import example_specs

PAGE = Path(__file__).resolve().parents[2] / "docs" / "spec.md"
TEXT = PAGE.read_text(encoding="utf-8")


def section(heading: str) -> str:
    """The text under a markdown heading, up to the next heading of any level."""
    match = re.search(rf"^#+ {re.escape(heading)}\n(.*?)(?=^#+ |\Z)", TEXT, re.M | re.S)
    assert match, f"docs/spec.md has no section '{heading}'"
    return match.group(1)


def table_keys(heading: str) -> set[str]:
    """The backticked names in the first column of the table rows under ``heading``."""
    keys = set()
    for line in section(heading).splitlines():
        cell = line.split("|")[1].strip() if line.startswith("|") else ""
        match = re.fullmatch(r"`(\w+)`", cell)
        if match:
            keys.add(match.group(1))
    return keys


@pytest.mark.parametrize(("heading", "keys"), [
    ("Top-level keys", schema.KEYS),
    ("Input keys", schema.INPUT_KEYS),
    ("Lowrank keys", schema.LOWRANK_KEYS),
])
def test_key_tables_match_the_schema_both_ways(heading, keys):
    documented = table_keys(heading)
    assert set(keys) - documented == set(), "keys in the schema but not on the page"
    assert documented - set(keys) == set(), "keys on the page but not in the schema"


def test_every_choice_function_and_size_is_named():
    values = (*schema.SCORES, *schema.NORMALIZERS, *schema.FEATURE_MAPS, *schema.DTYPES,
              *schema.LOWRANK_METHODS, *expr.FUNCTIONS, *SIZE_NAMES, "b", "h", "q_idx",
              "kv_idx", "score")
    missing = [v for v in values if not re.search(rf"\b{re.escape(v)}\b", TEXT)]
    assert missing == []


def test_limits_are_stated_with_their_values():
    limits = section("Expressions")
    for value in (expr.MAX_LENGTH, expr.MAX_DEPTH, expr.MAX_NODES, expr.MAX_EXPONENT,
                  expr.MAX_POWER_DIGITS):
        assert re.search(rf"\b{value}\b", limits), value


def test_implied_inputs_are_documented():
    rows = section("Implied inputs")
    for name in ("E", "F", "mem_k", "mem_v", "w", "omega"):
        assert f"`{name}`" in rows, name


def code_blocks():
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", TEXT, re.S):
        if lang == "yaml":
            yield lang, yaml.safe_load(body)
        elif lang == "toml":
            yield lang, tomllib.loads(body)
        elif lang == "json":
            yield lang, json.loads(body)


def test_every_spec_on_the_page_loads():
    specs = [data for _, data in code_blocks() if isinstance(data, dict) and "attncc" in data]
    assert len(specs) >= 15
    names = [attncc.load_spec(data).name for data in specs]
    assert len(set(names)) == len(names)
    assert {lang for lang, _ in code_blocks()} >= {"yaml", "toml", "json"}


def test_every_example_file_feature_has_a_page_example():
    """Each feature key used by some example file appears in a spec on the page."""
    used = set()
    for path in example_specs():
        used |= set(attncc.load_spec(path).source)
    on_page = set()
    for _, data in code_blocks():
        if isinstance(data, dict):
            on_page |= set(data)
    assert used - on_page - {"doc"} == set()


def test_the_unused_input_rule_is_stated_with_the_real_error(tmp_path):
    """The Input keys section states the rule; the Errors section shows the message verbatim."""
    assert "Every declared input must be read by `mask` or `score_mod`" in section("Input keys")
    shown = [line for line in section("Errors").splitlines() if "never read" in line]
    assert len(shown) == 1
    path = tmp_path / "alibi.yaml"
    path.write_text("attncc: 1\nmask: kv_idx <= q_idx\ninputs:\n  slopes: {shape: [heads]}\n")
    with pytest.raises(attncc.SpecError) as info:
        attncc.load_spec(path)
    assert str(info.value) == shown[0].replace("alibi.yaml", str(path), 1)

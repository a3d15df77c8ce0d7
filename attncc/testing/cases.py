"""The pytest-friendly conformance suite: cases over every example spec, and ``run_case``.

A backend's whole conformance test is::

    import pytest
    from attncc.testing import conformance_cases, run_case

    CASES = conformance_cases("numpy")

    @pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
    def test_conformance(case):
        run_case(case)

``run_case`` skips (pytest.skip) when the backend's ``supports()`` refuses the spec, or when the
spec cannot take the case's sizes (``seq_q != seq_k`` where an input is indexed past its length);
otherwise it raises AssertionError with the readable ``Report`` on failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from attncc.errors import InputError
from attncc.reference import reference
from attncc.spec.load import load_spec
from attncc.testing.accuracy import Report, check_kernel
from attncc.testing.examples import example_specs
from attncc.testing.inputs import random_inputs

#: (batch, seq_q, seq_k, config): one token, a length that is not a multiple of any tile, a
#: longer one, decoding (fewer queries than keys) and more queries than keys; the two marked
#: "smallest" run with the backend's smallest tiles so that many blocks are FULL, PARTIAL, EMPTY.
SIZES = ((1, 1, 1, "default"), (2, 37, 37, "default"), (1, 100, 100, "default"),
         (2, 24, 77, "default"), (1, 61, 19, "default"), (2, 37, 37, "smallest"),
         (2, 24, 77, "smallest"))
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Case:
    """One conformance run: a backend on one spec file, dtype, sizes and tile choice."""

    backend: str
    spec_path: str
    dtype: str
    batch: int
    seq_q: int
    seq_k: int
    config: str = "default"  # default | smallest (the search space's smallest tiles)
    library: str = "numpy"
    device: str | None = None
    seed: int = 0

    @property
    def id(self) -> str:
        return (f"{Path(self.spec_path).stem}-{self.dtype}-b{self.batch}-q{self.seq_q}"
                f"-k{self.seq_k}-{self.config}")


def conformance_cases(backend: str, dtypes=DTYPES, *, library: str | None = None,
                      device: str | None = None, sizes=SIZES, specs=None) -> list[Case]:
    """Every (example spec, dtype, size) case for ``backend``.

    ``library`` is the array library the backend takes: the backend class's ``library``
    attribute when it has one, else torch. ``specs`` defaults to ``example_specs()``.
    """
    if library is None:
        from attncc.backends import registry

        library = getattr(registry.get(backend), "library", "torch")
    specs = example_specs() if specs is None else specs
    return [Case(backend, str(path), dtype, b, sq, sk, cfg, library, device)
            for path in specs for dtype in dtypes for (b, sq, sk, cfg) in sizes]


def run_case(case: Case) -> Report:
    """Run one case; skip where it does not apply, AssertionError with the report on failure."""
    spec = load_spec(case.spec_path)
    kernel = _compile(case, spec)
    q, k, v, inputs = random_inputs(spec, case.batch, case.seq_q, case.seq_k, case.dtype,
                                    case.seed, case.library, case.device)
    try:
        reference(spec, q, k, v, **inputs)
    except InputError as err:
        if case.seq_q == case.seq_k:
            raise
        _skip(f"'{spec.name}' does not take seq_q {case.seq_q} != seq_k {case.seq_k}: {err}")
    report = check_kernel(kernel, spec, q, k, v, inputs, seed=case.seed)
    if not report.ok:
        raise AssertionError(f"{case.id}\n{report}")
    return report


def _compile(case: Case, spec):
    from attncc.backends import registry
    from attncc.passes.pipeline import lower

    backend = registry.get(case.backend)
    graph = lower(spec)
    target = _target(case)
    support = backend.supports(graph, target)
    if not support:
        _skip(f"backend '{case.backend}' does not support '{spec.name}': {support.reason}")
    config = None
    if case.config == "smallest":
        configs = backend.search_space(graph, target).configs()
        config = min(configs, key=_tile_area) if configs and configs[0] else None
    try:
        from attncc.api import compile as compile_spec
    except ImportError:
        full = {**backend.default_config(graph, target), **(config or {})}
        return backend.compile(graph, full, target)
    return compile_spec(spec, backend=case.backend, target=target, config=config)


def _tile_area(config: dict) -> int:
    area = 1
    for value in config.values():
        area *= value if isinstance(value, int) else 1
    return area


def _target(case: Case):
    try:
        from attncc.target import Target
    except ImportError:
        return None
    device = str(case.device or "cpu")
    return Target.detect(device if device.startswith("cuda") else "cpu")


def _skip(reason: str):
    try:
        import pytest
    except ImportError:  # pragma: no cover - only without pytest
        raise CaseSkipped(reason) from None
    pytest.skip(reason)


class CaseSkipped(Exception):  # noqa: N818 - read as an outcome, like pytest's Skipped
    """Raised by ``run_case`` instead of pytest.skip where pytest is not installed."""

"""The pytest-friendly conformance suite: cases over every example spec, and ``run_case``.

A backend's whole conformance test is::

    import pytest
    from attncc.testing import conformance_cases, run_case

    CASES = conformance_cases("numpy")

    @pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
    def test_conformance(case):
        run_case(case)

Cases are only generated for sizes a spec can take (``inputs.unfit_reason``: an input shaped
``[batch, seq_q]`` and indexed by ``kv_idx`` gets no ``seq_k > seq_q`` case), so a case that
fails to bind is a failure, never a skip. ``run_case`` skips (pytest.skip) only when the backend's
``supports()`` refuses the spec, and with ``refusals="fail"`` not even then; otherwise it raises
AssertionError with the readable ``Report`` on failure.

Besides the sizes, an *extreme* family (``EXTREME_SIZES``) draws scores with a standard
deviation of ``EXTREME_STD`` (around ±1e3, up to ~±4e3 before softmax) for every spec whose
normalization exponentiates scores, so a kernel that does not subtract the row maximum before
``exp`` (or rescale its running sums correctly) overflows and fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from attncc.spec.load import load_spec
from attncc.testing.accuracy import Report, check_kernel
from attncc.testing.examples import example_specs
from attncc.testing.inputs import random_inputs, sizes_for, unfit_reason

#: (batch, seq_q, seq_k, config): one token, a length that is not a multiple of any tile, a
#: longer one, decoding (fewer queries than keys) and more queries than keys; the two marked
#: "smallest" run with the backend's smallest tiles so that many blocks are FULL, PARTIAL, EMPTY.
SIZES = ((1, 1, 1, "default"), (2, 37, 37, "default"), (1, 100, 100, "default"),
         (2, 24, 77, "default"), (1, 61, 19, "default"), (2, 37, 37, "smallest"),
         (2, 24, 77, "smallest"))
DTYPES = ("float32", "float64")
#: Sizes of the extreme-score family, and the scores' standard deviation there.
EXTREME_SIZES = ((2, 37, 37, "default"), (2, 24, 77, "smallest"))
EXTREME_STD = 1e3


@dataclass(frozen=True)
class Case:
    """One conformance run: a backend on one spec file, dtype, sizes and tile choice;
    ``score_std`` set for the extreme-score family."""

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
    score_std: float | None = None

    @property
    def id(self) -> str:
        extreme = f"-std{self.score_std:g}" if self.score_std is not None else ""
        return (f"{Path(self.spec_path).stem}-{self.dtype}-b{self.batch}-q{self.seq_q}"
                f"-k{self.seq_k}-{self.config}{extreme}")


def exponentiates(spec) -> bool:
    """Whether the spec's normalization runs scores through ``exp`` (softmax, top-k, sigmoid),
    where large scores test overflow handling. Nyström is left out: its large-score limit makes
    the landmark kernel one-hot and, when two landmarks pick the same key, singular, where the
    pinv (and so the reference itself) is discontinuous in its inputs."""
    nystrom = spec.lowrank is not None and spec.lowrank.method == "nystrom"
    return spec.normalize in ("softmax", "topk", "sigmoid") and not nystrom


def conformance_cases(backend: str, dtypes=DTYPES, *, library: str | None = None,
                      device: str | None = None, sizes=SIZES, specs=None,
                      extreme_sizes=EXTREME_SIZES) -> list[Case]:
    """Every (example spec, dtype, size) case for ``backend`` that the spec can take, then the
    extreme-score family (``extreme_sizes``; empty for none) for specs that ``exponentiates``.

    ``library`` is the array library the backend takes (default: ``Backend.library``);
    ``specs`` defaults to ``example_specs()``.
    """
    if library is None:
        from attncc.backends import registry

        library = registry.get(backend).library
    specs = example_specs() if specs is None else specs
    cases = []
    for path in specs:
        spec = load_spec(path)
        families = [(sizes, None)]
        if exponentiates(spec):
            families.append((extreme_sizes, EXTREME_STD))
        for family, std in families:
            for dtype in dtypes:
                for b, sq, sk, cfg in family:
                    if unfit_reason(spec, sizes_for(spec, b, sq, sk)) is None:
                        cases.append(Case(backend, str(path), dtype, b, sq, sk, cfg, library,
                                          device, score_std=std))
    return cases


def run_case(case: Case, *, refusals: str = "skip") -> Report:
    """Run one case; AssertionError with the report on failure. Where the backend's
    ``supports()`` refuses the spec: pytest.skip with ``refusals="skip"``, AssertionError with
    ``refusals="fail"`` (for backends that claim every spec)."""
    spec = load_spec(case.spec_path)
    kernel = _compile(case, spec, refusals)
    q, k, v, inputs = random_inputs(spec, case.batch, case.seq_q, case.seq_k, case.dtype,
                                    case.seed, case.library, case.device,
                                    score_std=case.score_std)
    report = check_kernel(kernel, spec, q, k, v, inputs, seed=case.seed)
    if not report.ok:
        raise AssertionError(f"{case.id}\n{report}")
    return report


def _compile(case: Case, spec, refusals: str):
    from attncc.backends import registry
    from attncc.passes.pipeline import lower
    from attncc.target import Target

    backend = registry.get(case.backend)
    graph = lower(spec)
    device = str(case.device or "cpu")
    target = Target.detect(device if device.startswith("cuda") else "cpu")
    support = backend.supports(graph, target)
    if not support:
        reason = f"backend '{case.backend}' does not support '{spec.name}': {support.reason}"
        if refusals == "fail":
            raise AssertionError(reason)
        _skip(reason)
    config = None
    if case.config == "smallest":
        configs = backend.search_space(graph, target).configs()
        config = min(configs, key=_tile_area) if configs and configs[0] else None
    from attncc.api import compile as compile_spec

    return compile_spec(spec, backend=case.backend, target=target, config=config)


def _tile_area(config: dict) -> int:
    return math.prod(value if isinstance(value, int) else 1 for value in config.values())


def _skip(reason: str):
    try:
        import pytest
    except ImportError:  # pragma: no cover - only without pytest
        raise CaseSkipped(reason) from None
    pytest.skip(reason)


class CaseSkipped(Exception):  # noqa: N818 - read as an outcome, like pytest's Skipped
    """Raised by ``run_case`` instead of pytest.skip where pytest is not installed."""

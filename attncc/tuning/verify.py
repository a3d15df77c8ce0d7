"""[7] Checks before a config is trusted: its output against the reference, and a record from
another target's layer timed against the backend's default config.

Neither needs Optuna: ``attncc.compile``'s per-shape dispatch (``dispatch.py``) uses both, the
tuner (``tuner.py``) the first.

``wrong_output`` runs a kernel on small random inputs (at most ``CHECK_SEQ`` queries and keys,
batch 1) and judges it against ``attncc.reference`` by the conformance rule
(``attncc.testing.accuracy``); a kernel that fails it must never be stored.

``against_default`` is the verdict on a *hint* (a record that matched only through a fallback
layer, ``Record.layer`` < 3): the hint's kernel and the default config's kernel are timed on the
call that first needs them (``ROUNDS`` interleaved rounds of ``REPEAT`` calls each, medians, the
faster round kept per side); the faster wins, so the result is never slower than the default
beyond timing noise. The verdict is a Record for this exact target with ``verified`` saying what
was compared.
"""

from __future__ import annotations

from attncc.db.key import Key, Record, tuned_versions
from attncc.tuning import measure

#: Longest query and key length of the correctness check's inputs.
CHECK_SEQ = 256
#: Timed calls per side and round, and interleaved rounds, of a hint's check.
REPEAT, ROUNDS = 5, 2


def wrong_output(kernel, spec, seq_q: int, seq_k: int, dtype: str, library: str,
                 device=None, heads: int | None = None) -> str | None:
    """None when ``kernel``'s output (and lse) on small random inputs pass the conformance rule
    against ``attncc.reference``; else one line saying which quantity is off and by how much.
    Exceptions from the kernel propagate."""
    from attncc.testing.accuracy import check_kernel
    from attncc.testing.inputs import random_inputs

    q, k, v, inputs = random_inputs(spec, 1, min(seq_q, CHECK_SEQ), min(seq_k, CHECK_SEQ), dtype,
                                    1, library, device, heads=heads)
    report = check_kernel(kernel, spec, q, k, v, inputs, grads=False)
    bad = [c for c in report.checks if not c.ok]
    if not bad:
        return None
    return (f"wrong output: {bad[0].quantity} error {bad[0].error:.3g} exceeds the conformance "
            f"bound {bad[0].bound:.3g} (against attncc.reference, seq_q={q.shape[2]}, "
            f"seq_k={k.shape[2]}, {dtype})")


def against_default(hint: Record, hint_kernel, default_kernel, call: tuple, key: Key, *,
                    spec, backend, target) -> Record:
    """The verdict on ``hint`` (see the module docstring): a Record under ``key`` (this target)
    holding whichever of ``hint_kernel`` and ``default_kernel`` ran ``call`` (``q, k, v,
    inputs``) faster. A hint whose output is wrong loses untimed."""
    q, k = call[0], call[1]
    problem = wrong_output(hint_kernel, spec, q.shape[-2], k.shape[-2], key.dtype,
                           backend.library, target.torch_device, q.shape[1])
    if problem is None:
        hint_t, default_t = _interleaved(hint_kernel, default_kernel, call, target.sync)
        keep = hint_t.median_s <= default_t.median_s
        timed = (f"{hint_t.median_s * 1e3:.4g} ms vs {default_t.median_s * 1e3:.4g} ms for the "
                 f"default config")
    else:
        keep, default_t = False, _interleaved(default_kernel, None, call, target.sync)[0]
        timed = problem
    winner = (hint_kernel, hint_t) if keep else (default_kernel, default_t)
    sizes = f"batch={q.shape[0]}, heads={q.shape[1]}, seq_q={q.shape[-2]}, seq_k={k.shape[-2]}"
    verdict = (f"{'kept' if keep else 'default config kept instead of'} record {hint.id} (tuned "
               f"on {hint.key.target}): {timed} at {sizes}")
    return Record(key, spec.name, dict(winner[0].config), winner[1].median_s, winner[1].spread_s,
                  2, target.to_dict(), tuned_versions(target, backend), verified=verdict)


def _interleaved(first, second, call: tuple, sync) -> tuple:
    """Timings of ``first`` and ``second`` (None: not timed) on ``call``, each the fastest of
    ``ROUNDS`` interleaved rounds."""
    q, k, v, inputs = call
    best = [None, None]
    for _ in range(ROUNDS):
        for side, kernel in enumerate((first, second)):
            if kernel is None:
                continue
            timing = measure.time_call(lambda kernel=kernel: kernel(q, k, v, **inputs),
                                       warmup=1, repeat=REPEAT, sync=sync, budget_s=0.5)
            if best[side] is None or timing.median_s < best[side].median_s:
                best[side] = timing
    return best[0], best[1]

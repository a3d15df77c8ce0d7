"""Interval reasoning over the IR's sympy expressions, apart from the passes that use it.

``intervals`` classifies a condition three-valued (NEVER / MAYBE / ALWAYS) over many integer boxes
of ``b, h, q_idx, kv_idx`` at once, vectorized with NumPy; ``interval_math`` is its arithmetic on
bounds. The ``strategy`` pass, the block plan (``attncc.plan``) and the backends read it; it reads
nothing of the IR but sympy expressions.
"""

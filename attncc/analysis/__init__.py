"""Interval reasoning over the IR's sympy expressions, apart from the passes that use it.

``intervals`` classifies a condition three-valued (NEVER / MAYBE / ALWAYS) over many integer boxes
of ``b, h, q_idx, kv_idx`` at once, vectorized with NumPy, and bounds numbers over them;
``interval_math`` is its arithmetic on bounds; ``ranges`` gives an array's min/max over per-box
index ranges (an input read at computed indices). The block plan (``attncc.plan``) uses them;
they read nothing of the IR but sympy expressions and arrays.
"""

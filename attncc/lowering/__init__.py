"""The shared lowering layer: recipes every array backend runs, each written once (DESIGN §2).

Array-API code (the namespace comes from the arrays, ``array_api_compat.array_namespace``), so the
numpy and torch backends run the same lines, torch autograd included; the Triton generator reads
its rules and constants.

- ``prologue``: the call prologue (array kind, ``bind``, compute dtype, the lse rule, casts).
- ``states``: online softmax, sigmoid sum and the top-k threshold over key tiles.
- ``env``: the tile index environment ``b, h, q_idx, kv_idx`` for a backend's tile layout.
- ``features``: linear-attention feature maps, their vector-Jacobian products, the division rule.
- ``lowrank``: the Linformer projection and Nyström attention.
- ``maps``: attention maps and per-row statistics from a kernel's own lse (one more pass over
  the visited blocks); ``requests``: their argument checks and which normalisation defines what.
"""

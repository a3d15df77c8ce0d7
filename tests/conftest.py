"""Test-session set-up shared by every test module.

Triton reads TRITON_INTERPRET when it is first imported, and any module may import it first (the
backend registry loads every plugin), so it is set here, before collection, on machines with no GPU.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

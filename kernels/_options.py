"""Compile options shared by the CPU and CUDA loop generators."""

import hashlib
import os
from pathlib import Path

#: fastmath is off unless FASTRMS_FASTMATH=1: it lets LLVM reorder and contract the
#: arithmetic, so results would no longer match the NumPy reference or PyTorch bit for bit.
FASTMATH = os.environ.get("FASTRMS_FASTMATH", "0") == "1"

# Numba keys a cached kernel on the file that defines the loop, not on the rules it inlines.
# Binding this digest of rules.py into every loop (with the fastmath setting, which is not part
# of Numba's key either) makes an edit to a rule, or a change of FASTRMS_FASTMATH, recompile.
RULES_TOKEN = (
    int(hashlib.sha256((Path(__file__).parent / "rules.py").read_bytes()).hexdigest()[:15], 16),
    FASTMATH,
)

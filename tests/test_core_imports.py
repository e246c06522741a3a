"""The core must import and run without detectron2 and without torchvision."""

from __future__ import annotations

import subprocess
import sys

BLOCK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('detectron2', 'torchvision'):
            raise ImportError('blocked for this test: ' + name)
sys.meta_path.insert(0, _Block())
"""

CORE = [
    "crm_d2", "crm_d2.fusion", "crm_d2.segments", "crm_d2.visualize", "crm_d2.evaluation",
    "crm_d2.training.trainer", "crm_d2.training.sources", "crm_d2.cli.refine", "crm_d2.cli.eval",
    "crm_d2.crm_eval", "crm_d2.options", "crm_d2.boxes", "crm_d2.pipeline",
]


def test_core_imports_without_detectron2_and_torchvision():
    code = BLOCK + "\n".join(f"import {m}" for m in CORE) + """
import numpy as np
from crm_d2 import CRMNet, CRMRefiner
from crm_d2.modeling.crm import TINY_ARCH
out = CRMRefiner(CRMNet(TINY_ARCH)).refine(np.zeros((8, 9, 3), np.uint8), np.ones((8, 9), bool))
assert out.shape == (8, 9)
try:
    import crm_d2.d2.meta_arch
except ImportError as e:
    assert 'blocked' in str(e), e
else:
    raise AssertionError('the detectron2 layer imported without detectron2')
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]

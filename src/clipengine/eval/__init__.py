"""Accuracy evaluation: local datasets, zero-shot and linear-probe metrics, reports, synthetic data.

Submodules are imported on use (`from clipengine.eval import zeroshot`) so `import clipengine.eval`
stays cheap and needs neither torch nor scikit-learn.
"""

from __future__ import annotations

__all__: list[str] = []

"""Shared helpers for the encoder parity tests: a `parity` checker that records every measured max |diff|.

Each comparison prints a `PARITY` line (visible with `pytest -s`) and is attached to its test's report
(`user_properties`, which pytest-xdist carries back from its workers); the whole table is printed in the terminal
summary, so the numbers reported for the encoders come straight from the test run.
"""

from __future__ import annotations

import numpy as np
import pytest

_PROPERTY = "parity"


def max_abs_diff(ours, reference, mask=None) -> float:
    """max |ours - reference| over the positions where `mask` (batch, length) is true (all if None)."""
    ours = np.asarray(ours, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if ours.shape != reference.shape:
        raise AssertionError(f"shape {ours.shape} != reference shape {reference.shape}")
    if mask is not None:
        mask = np.asarray(mask).astype(bool)
        ours, reference = ours[mask], reference[mask]
    return float(np.max(np.abs(ours - reference)))


@pytest.fixture
def parity(request):
    """check(model, quantity, ours, reference, bound, mask=None, relative=False) -> measured value.

    Asserts max |ours - reference| <= bound, or with `relative=True` max |ours - reference| / max |reference| <=
    bound (used for bf16, whose rounding error scales with the magnitude of the values). Every measurement is recorded.
    """

    def check(model: str, quantity: str, ours, reference, bound: float, mask=None, relative: bool = False) -> float:
        diff = max_abs_diff(ours, reference, mask)
        what = "max|diff|"
        if relative:
            scale = max_abs_diff(np.zeros_like(np.asarray(reference, np.float64)), reference, mask)
            diff, what = diff / scale, "max|diff|/max|ref|"
        label = f"{model} [{what}]"
        request.node.user_properties.append((_PROPERTY, (label, quantity, diff, bound)))
        print(f"PARITY {label:54s} {quantity:30s} {diff:.3e}  (bound {bound:.0e})")
        assert diff <= bound, f"{model} {quantity}: {what} {diff:.3e} > {bound:.0e}"
        return diff

    return check


def pytest_terminal_summary(terminalreporter):
    measured = [value for reports in terminalreporter.stats.values() for report in reports
                if getattr(report, "when", None) == "call"
                for name, value in getattr(report, "user_properties", ()) if name == _PROPERTY]
    if not measured:
        return
    terminalreporter.section("encoder parity vs HF PyTorch (worst over the compared outputs)")
    worst: dict[tuple[str, float], float] = {}
    for model, quantity, diff, bound in measured:
        key = (model, bound)
        worst[key] = max(worst.get(key, 0.0), diff)
    for (model, bound), diff in sorted(worst.items()):
        terminalreporter.write_line(f"{model:62s} worst {diff:.3e}  (bound {bound:.0e})")

"""The ``backend`` fixture: every registered backend; one not usable here skips with its own reasons."""

from __future__ import annotations

import pytest

from portattn.backends import registry


@pytest.fixture(params=list(registry()))
def backend(request):
    candidate = registry()[request.param]
    if not candidate.usable:
        pytest.skip(f"{candidate.name} is not usable here: " + "; ".join(candidate.unavailable_reasons()))
    return candidate

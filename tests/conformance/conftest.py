"""The ``backend`` fixture: every registered backend; one not usable here skips with its own reasons."""

from __future__ import annotations

import pytest

from portattn.backends import registry


@pytest.fixture(params=list(registry()))
def backend(request, usable_backend):
    return usable_backend(request.param)

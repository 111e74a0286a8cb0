"""What is usable on this machine: each backend's status, and why not where it is not."""

from __future__ import annotations

from dataclasses import dataclass

from .backends import registry


@dataclass(frozen=True)
class BackendStatus:
    name: str
    usable: bool
    reasons: tuple[str, ...]  # why it is not usable here; empty when it is
    summary: str
    install: str | None  # the pip extra that installs it

    def __str__(self) -> str:
        state = "usable" if self.usable else "unavailable: " + "; ".join(self.reasons)
        return f"{self.name}: {state}"


def backends() -> list[BackendStatus]:
    """Every known backend with whether it is usable here and, if not, why."""
    return [
        BackendStatus(
            name,
            backend.usable,
            tuple(backend.unavailable_reasons()),
            backend.summary,
            f"pip install 'portattn[{backend.extra}]'" if backend.extra else None,
        )
        for name, backend in registry().items()
    ]


def available_backends() -> list[str]:
    """Names of the backends usable on this machine."""
    return [status.name for status in backends() if status.usable]

"""The capability table, generated from the backends' own declarations (``Capabilities``).

``portattn info --features`` prints it and ``docs/backends.md`` is written from it
(``python docs/gen_backends_table.py``; a test checks the file is current), so the table cannot
drift from the code: a backend that gains a feature declares it, and both change with it.
"""

from __future__ import annotations

from .spec import DTYPES, FEATURES


def _backends():
    from .backends import registry

    return registry()


def summary_rows() -> list[tuple[str, ...]]:
    """One row per backend: where it runs, dtypes, head dims, backward, when auto picks it."""
    rows = [("backend", "devices", "min compute capability", "dtypes", "head dims", "backward", "auto on")]
    for name, backend in _backends().items():
        caps = backend.declared_capabilities()
        auto = ", ".join(f"{kind} (rank {rank})" for kind, rank in sorted(backend.auto_priority.items())) or "never"
        cc = caps.min_compute_capability
        rows.append((name, ", ".join(sorted(caps.device_kinds)), f"sm_{cc[0]}{cc[1]}" if cc else "-",
                     ", ".join(d for d in DTYPES if d in caps.dtypes),
                     f"{caps.min_head_dim}..{caps.max_head_dim}", "yes" if caps.backward else "no", auto))
    return rows


def feature_rows() -> list[tuple[str, ...]]:
    """One row per feature, one column per backend: "yes" or "no"."""
    backends = _backends()
    rows = [("feature", *backends)]
    for feature in FEATURES:
        rows.append((feature, *("yes" if feature in b.declared_capabilities().features else "no" for b in backends.values())))
    return rows


def notes() -> list[tuple[str, str, str]]:
    """(backend, topic, note): how each backend does a feature, why it refuses one, and general notes."""
    found = []
    for name, backend in _backends().items():
        caps = backend.declared_capabilities()
        found += [(name, "general", note) for note in caps.notes]
        found += [(name, feature, caps.feature_notes[feature]) for feature in FEATURES if feature in caps.feature_notes]
        found.append((name, "KV cache", caps.kvcache or "no kernel reads the cache in place: attention_with_kvcache "
                      "gathers each sequence's keys into one buffer for the ordinary forward"))
    return found


def _markdown(rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def markdown() -> str:
    """The capability section of docs/backends.md."""
    parts = ["## Backends", "", _markdown(summary_rows()), "", "## Features", "",
             _markdown(feature_rows()), "", "What each feature means:", ""]
    parts += [f"- `{feature}`: {meaning}" for feature, meaning in FEATURES.items()]
    parts += ["", "## Notes (how, or why not)", ""]
    parts += [f"- **{name}**, {topic}: {note}" for name, topic, note in notes()]
    return "\n".join(parts) + "\n"


def text() -> str:
    """The same tables for a terminal."""
    out = []
    for title, rows in (("capabilities:", summary_rows()), ("features:", feature_rows())):
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        out.append(title)
        out += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    out.append("notes:")
    out += [f"  {name}, {topic}: {note}" for name, topic, note in notes()]
    return "\n".join(out)

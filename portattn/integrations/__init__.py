"""Adapters that plug portattn into other libraries; each module imports its library only when used."""

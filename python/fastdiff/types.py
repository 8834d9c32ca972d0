"""Types shared across the package (placeholder until merge: the typed batch comes from another branch)."""

from typing import Any

Batch = dict[str, Any]

"""Model zoo: registry of architectures x encoders, checkpoints, complexity, export.

``from medseg.models import build_model, list_models`` (imports torch).
"""

from __future__ import annotations

from medseg.models.registry import ARCHITECTURES, ENCODERS, build_model, list_encoders, list_models

__all__ = ["ARCHITECTURES", "ENCODERS", "build_model", "list_encoders", "list_models"]

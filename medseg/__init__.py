"""medseg: lesion segmentation for volumetric CT and MR scans."""

from __future__ import annotations

__version__ = "0.1.0"

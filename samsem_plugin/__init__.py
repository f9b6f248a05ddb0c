"""samsem_plugin: SAM proposes masks, a DINOv2 (any timm backbone) exemplar memory names them.

The library takes image arrays and returns :class:`~samsem_plugin.regions.Regions`; it never reads
the environment, never fetches URLs and never imports the HTTP service (``backend``).
"""

from samsem_plugin.regions import UNKNOWN, Regions, boxes_from_masks

__all__ = ["UNKNOWN", "Regions", "boxes_from_masks"]
__version__ = "0.1.0"

"""A notice of transformers that a diffusers-delta user cannot act on, kept off their terminal.

diffusers imports `CLIPImageProcessor` and `SiglipImageProcessor` for pipelines and IP-Adapters this package never
builds (FLUX.1 Kontext's module, `loaders.ip_adapter`). Without torchvision (which PyPI's wheels do not import beside
the pinned CPU torch), transformers answers each name with its PIL processor and says so: "`CLIPImageProcessor`
requires torchvision (not installed); falling back to `CLIPImageProcessorPil`...", two lines before every command's
own output, `--help` included. This package itself uses the processors that need no torchvision
(`SiglipImageProcessorPil`), so that notice is dropped, and only it: every other message of transformers passes.
"""

from __future__ import annotations

import logging
import re


#: transformers' notice of an image processor that falls back to its PIL backend without torchvision.
_FALLBACK_NOTICE = re.compile(r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+Pil`")


class TorchvisionFallbackFilter(logging.Filter):
    """Drops transformers' torchvision-fallback notice (`_FALLBACK_NOTICE`), and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for transformers' torchvision-fallback notice, True for every other record."""
        return _FALLBACK_NOTICE.search(record.getMessage()) is None


def quiet_torchvision_fallback() -> None:
    """Installs `TorchvisionFallbackFilter` on the logger transformers gives the notice through (once; before
    transformers is imported, the logger is made now and transformers takes it over)."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(existing, TorchvisionFallbackFilter) for existing in logger.filters):
        logger.addFilter(TorchvisionFallbackFilter())


quiet_torchvision_fallback()  # on import: the package's __init__ imports this module before diffusers

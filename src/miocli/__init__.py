"""miocli: run the MIO any-to-any multimodal model from the command line or Python."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"
__all__ = ["Audio", "GenerationOptions", "Item", "Mio", "Result", "Step", "StoryPart", "__version__"]

if TYPE_CHECKING:
    from miocli.core.api import GenerationOptions, Item, Mio
    from miocli.core.results import Audio, Result, Step, StoryPart


def __getattr__(name: str) -> Any:
    # Keep `import miocli` light: the API pulls in the runtime only when it is used.
    if name in __all__ and name != "__version__":
        from miocli.core import api

        return getattr(api, name)
    raise AttributeError(name)

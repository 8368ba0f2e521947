"""miocli: run the MIO any-to-any multimodal model from the command line or Python."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"
__all__ = ["Mio", "__version__"]

if TYPE_CHECKING:
    from miocli.api import Mio


def __getattr__(name: str) -> Any:
    # Keep `import miocli` light: the API pulls in the runtime only when it is used.
    if name == "Mio":
        from miocli.api import Mio

        return Mio
    raise AttributeError(name)

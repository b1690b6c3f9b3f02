"""Third-party noise off where it starts, so a run's log holds only our lines. Each silencing names one message.

- bitsandbytes (imported by PEFT as well) fetches a CPU kernel from the Hugging Face Hub when it is imported on a
  CPU with AVX512-BF16 (kernels-community/quantization-bitsandbytes through the `kernels` package: seconds of
  network without HF_HUB_OFFLINE) and logs a warning either way ("Skipping publisher trust check ..." when offline,
  "Failed to load CPU gemm_4bit_forward ..." when the fetch fails). That kernel serves only the repacked-weight
  path that fix_bnb_cpu switches off, so `import_bitsandbytes` imports it with the Hub offline (`kernels` reads
  huggingface_hub.constants.HF_HUB_OFFLINE when called; a kernel already cached still loads), and `quiet` drops
  those two records with a filter on each of the two loggers.
- transformers warns that `is_gradient_checkpointing` is deprecated (FutureWarning) whenever PEFT wraps a model:
  PEFT reads that property, and a property cannot be shadowed on the instance. Ignored by that message, that
  category and transformers' module only.
"""

from __future__ import annotations

import logging
import sys
import warnings
from types import ModuleType

# logger -> the starts of the records dropped from it
NOISE = {
    "kernels._internals.hf_hub": ("Skipping publisher trust check",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
}
DEPRECATED = r"`is_gradient_checkpointing` is deprecated"
_DONE = {"quiet": False}


class _DropStarting(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet() -> None:
    """Install the filters above (before transformers, PEFT or bitsandbytes speak): the logging ones once per
    process, the warning one at every call (cheap, never doubled; a caller's catch_warnings may have reset it)."""
    warnings.filterwarnings("ignore", message=DEPRECATED, category=FutureWarning, module=r"transformers\.")
    if not _DONE["quiet"]:
        for name, starts in NOISE.items():
            logging.getLogger(name).addFilter(_DropStarting(starts))
        _DONE["quiet"] = True


def import_bitsandbytes(required: bool = True) -> ModuleType | None:
    """bitsandbytes, the first import made with the Hub offline and the filters on (see the module). Not installed:
    ImportError, or None when not `required` (call this before importing PEFT, which imports it when it can)."""
    quiet()
    if "bitsandbytes" not in sys.modules:
        import huggingface_hub.constants as hub

        offline, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
        try:
            import bitsandbytes  # noqa: F401  (the import is the point: kept in sys.modules)
        except ImportError:
            if required:
                raise
            return None
        finally:
            hub.HF_HUB_OFFLINE = offline
    return sys.modules["bitsandbytes"]

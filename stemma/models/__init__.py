"""Model architectures, tokenizers, and loading/saving in Hugging Face format."""

import warnings as _warnings

# Library chatter that says nothing to a stemma user: PEFT cannot find a hub config for a base named by
# content hash (by design), and transformers' deprecation notices about its own internals.
_warnings.filterwarnings("ignore", message="Could not find a config file")
_warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
_warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")


def quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()

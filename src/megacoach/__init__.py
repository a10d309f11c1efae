"""megacoach: fine-tuning language models from human preferences (Ziegler et al. 2019), with guards.

The story's names: the Apprentice (policy), human evaluators (labelers; mock labelers stand in),
the Values Coach (reward model), the Coherence Coach (KL penalty to the original model) and the
Megacoach (the combined reward, score - beta * KL, that PPO maximises).
"""

import os as _os
import warnings as _warnings

__version__ = "0.1.0"

_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
_warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
try:  # quiet transformers' progress bars and deprecation chatter in CLI output
    from transformers.utils import logging as _tlog

    _tlog.set_verbosity_error()
    _tlog.disable_progress_bar()
except Exception:  # pragma: no cover - transformers missing is reported where it is used
    pass

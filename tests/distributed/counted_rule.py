"""A rule function for ``RuleAnnotator`` (``counted_rule:gold``) recording each call (tests/distributed/fit.py).

Each call appends its (prompt, response) to the JSON list in ``$BPO_TEST_CALL_LOG`` (a resumed run adds to it) before
returning the review task's gold reward; with ``$BPO_TEST_KILL_CALL`` = N the whole job is SIGKILLed at the N-th call,
before it is computed.
"""

import json
import os
import signal
from pathlib import Path

from bpo_lightning.tasks import reviews

_CALLS: list[list[str]] = []


def gold(prompt: str, response: str) -> float:
    log = Path(os.environ["BPO_TEST_CALL_LOG"])
    if not _CALLS and log.exists():
        _CALLS.extend(json.loads(log.read_text()))
    kill_at = int(os.environ.get("BPO_TEST_KILL_CALL", "0"))
    gold.calls = getattr(gold, "calls", 0) + 1  # this attempt's calls
    if gold.calls == kill_at:
        os.killpg(os.getpgid(0), signal.SIGKILL)
    _CALLS.append([prompt, response])
    log.write_text(json.dumps(_CALLS))  # paid: recorded before the answer is handed over
    return reviews.gold_reward(prompt, response)

"""The ``flowing`` logger, which every module logs through.

Its ``NullHandler`` keeps flowing's messages off stderr (logging's last-resort
handler) until the application configures logging; it is installed by whichever
module first needs the logger, since ``import flowing`` does not load logging.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("flowing")
logger.addHandler(logging.NullHandler())

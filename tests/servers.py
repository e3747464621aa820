"""The server launchers moved to :mod:`pipeline.servers`; this name stays an alias of it."""

import sys

from pipeline import servers

sys.modules[__name__] = servers

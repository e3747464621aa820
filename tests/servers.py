"""The server launchers moved to :mod:`pipeline.servers`; this name stays for the tests."""

from pipeline.servers import *  # noqa: F403
from pipeline.servers import __all__  # noqa: F401

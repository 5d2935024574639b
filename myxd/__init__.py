"""MyX daemon: the active half. Owns every decision about when to talk to which agent."""

__version__ = "0.1.0"

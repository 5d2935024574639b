"""The daemon's admin API (Klein): `AdminAPI(...).resource()` is served by tap.makeService."""

from myxd.api.app import AdminAPI

__all__ = ["AdminAPI"]

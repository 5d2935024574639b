"""Installing agents over SSH: conch client, host-key trust, agent bundle, installer."""

from myxd.install.installer import (
    INSTALL_STEPS,
    UNINSTALL_STEPS,
    Installer,
    InstallError,
    InstallInProgress,
    InstallOutcome,
    ServerNotFound,
)

__all__ = [
    "INSTALL_STEPS",
    "UNINSTALL_STEPS",
    "InstallError",
    "InstallInProgress",
    "InstallOutcome",
    "Installer",
    "ServerNotFound",
]

# -*- test-case-name: tests.install.test_installer,tests.install.test_servers_api -*-
"""Installing agents over SSH. One room per job:

installer   the Installer service: start, wait and stop install jobs
steps       one async def per install step, over an InstallSession
session     the typed session, the shared InstallEnv, the store/RPC seams
journal     recording steps and events in the store
agents      the agent record an install works on (identity, port range)
reinstall   automatic reinstalls: ReinstallPolicy and the heartbeat's hook
host        RemoteHost, the protocol the steps use to reach a target
ssh         the conch client implementing it (sshauth, sshchannels, sshbase)
hostkeys    host-key trust; remote: the scripts and layout on the target
bundle      the agent's files, the wheelhouse, the deployment tool archive
"""

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

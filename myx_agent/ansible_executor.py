# -*- test-case-name: tests.agent.test_ansible -*-
"""Ansible playbook runs for the agent (``execute_ansible``; issue 2 section 7).

A run uses ansible-runner in a worker thread of the command runner's own pool
(an ansible-runner run blocks its thread for the whole playbook). Every line
that ansible-playbook prints reaches the reactor through ``callFromThread`` and
is appended to the command's combined stream as stdout, in order. Each run has
its own private data dir inside its command's record under ``state_dir``.

Killing: ansible-playbook's workers call ``setsid`` (ansible-core
``WorkerProcess._detach``), so they leave the playbook's process group, and
ansible-runner's own cancel only SIGKILLs that group. Every process of a run is
therefore marked with a unique environment variable (inherited by workers and
the tasks they start), and terminate() signals every process that carries it:
SIGTERM first, SIGKILL after the grace. These are short /proc scans done on the
reactor thread (no disk I/O).

It implements ``execution.Execution`` and reports through an
``execution.ExecutionSink`` like a process does.

What it must never do: import ansible_runner before a run needs it (the idle
agent's memory budget is 48 MiB), run a playbook outside
``<deployment_tool_dir>/playbooks``, put extra_vars on a command line (they may
hold secrets; they go to a 0600 file that is deleted after the run), or write
to the agent's own stdout.
"""

import json
import os
import shutil
import signal
import sys
import threading
import uuid
from typing import Any, Dict, Optional

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from myx_agent import process as proc
from myx_agent.errors import INVALID_PARAMS, RPCError
from myx_agent.execution import MARKER_ENV, ExecutionSink, Timers
from myx_agent.outputlog import STDOUT

STATS_KEYS = ("ok", "changed", "failures", "dark", "skipped", "ignored", "rescued", "processed")


def resolve_playbook(deployment_tool_dir: str, playbook: str) -> str:
    """The real path of ``playbook`` inside ``<deployment_tool_dir>/playbooks``.

    Raises -32602 for a path that escapes it (``..``, an absolute path, or a
    symlink pointing out) or that is not a file."""
    if not isinstance(playbook, str) or not playbook or "\0" in playbook:
        raise RPCError(INVALID_PARAMS, "invalid params: playbook must be a non-empty path")
    if os.path.isabs(playbook):
        raise RPCError(
            INVALID_PARAMS, "invalid params: playbook must be relative to the playbooks dir"
        )
    base = os.path.realpath(os.path.join(deployment_tool_dir, "playbooks"))
    target = os.path.realpath(os.path.join(base, playbook))
    if target == base or os.path.commonpath([base, target]) != base:
        raise RPCError(
            INVALID_PARAMS,
            f"invalid params: playbook {playbook!r} resolves outside the playbooks dir",
        )
    if not os.path.isfile(target):
        raise RPCError(INVALID_PARAMS, f"invalid params: playbook not found: {playbook}")
    return target


def find_ansible_playbook() -> Optional[str]:
    """ansible-playbook next to the running Python (the agent's venv), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable or ""), "ansible-playbook")
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return here
    return shutil.which("ansible-playbook")


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class AnsibleRun:
    """One ansible-runner run of one playbook, in a worker thread."""

    _log = Logger()

    #: How often the worker thread looks at the cancel flag (ansible-runner's
    #: pexpect_timeout); the tree kill itself does not wait for it.
    POLL_SECONDS = 1
    #: SIGKILL passes after the grace, for processes forked during a pass.
    KILL_PASSES = 5

    def __init__(
        self,
        reactor: Any,
        pool: Any,
        *,
        command_id: str,
        playbook_path: str,
        deployment_tool_dir: str,
        extra_vars_json: str,
        private_data_dir: str,
        check: bool = False,
        ansible_playbook: str,
        kill_grace: float,
        sink: ExecutionSink,
        timers: Timers,
    ) -> None:
        self._reactor = reactor
        self._pool = pool
        self.command_id = command_id
        self.playbook_path = playbook_path
        self.deployment_tool_dir = deployment_tool_dir
        self._extra_vars_json = extra_vars_json
        self.check = check
        self.private_data_dir = private_data_dir
        self.ansible_playbook = ansible_playbook
        self._kill_grace = kill_grace
        self._sink = sink
        self._timers = timers
        self.marker = uuid.uuid4().hex
        self._cancel = threading.Event()
        self._terminated = False

    def start(self) -> Dict[str, Any]:
        """Start the run in a worker thread; the sink hears its output and end."""
        d = deferToThreadPool(self._reactor, self._pool, self._run)

        def finished(summary: Dict[str, Any]) -> None:
            if self._terminated:
                self._kill_pass(signal.SIGKILL, passes_left=self.KILL_PASSES)
            rc = summary.get("rc")
            self._sink.ended(rc if isinstance(rc, int) else None, None, {"ansible": summary})

        def failed(f: Failure) -> None:
            self._log.failure("ansible run {command_id} failed", f, command_id=self.command_id)
            self._sink.ended(
                None,
                f"ansible-runner failed: {f.getErrorMessage()}",
                {"ansible": {"status": "failed", "rc": None, "stats": {}}},
            )

        d.addCallbacks(finished, failed).addErrback(
            lambda f: self._log.failure("ansible run {command_id}", f, command_id=self.command_id)
        )
        return {"env_marker": self.marker}

    def force_close(self) -> None:
        """Nothing to close: the worker thread ends when ansible-runner returns."""

    # -- thread ------------------------------------------------------------

    def _prepare(self) -> Dict[str, Any]:
        pdd = self.private_data_dir
        os.makedirs(os.path.join(pdd, "env"), mode=0o700, exist_ok=True)
        _write_private(os.path.join(pdd, "env", "extravars"), self._extra_vars_json.encode())
        # ansible-runner reads settings only from this file.
        _write_private(
            os.path.join(pdd, "env", "settings"),
            json.dumps(
                {
                    "pexpect_timeout": self.POLL_SECONDS,
                    "suppress_ansible_output": True,
                    "suppress_output_file": True,
                }
            ).encode(),
        )
        inventory = os.path.join(self.deployment_tool_dir, "inventory", "localhost.ini")
        kwargs: Dict[str, Any] = {}
        if os.path.isfile(inventory):
            kwargs["inventory"] = inventory
        else:
            os.makedirs(os.path.join(pdd, "inventory"), mode=0o700, exist_ok=True)
            _write_private(
                os.path.join(pdd, "inventory", "hosts"),
                b"localhost ansible_connection=local "
                b"ansible_python_interpreter='{{ ansible_playbook_python }}'\n",
            )
        envvars = {
            "PATH": os.path.dirname(self.ansible_playbook)
            + os.pathsep
            + os.environ.get("PATH", os.defpath),
            MARKER_ENV: self.marker,
            "ANSIBLE_NOCOLOR": "1",
        }
        config = os.path.join(self.deployment_tool_dir, "ansible.cfg")
        if os.path.isfile(config):
            envvars["ANSIBLE_CONFIG"] = config
        kwargs["envvars"] = envvars
        return kwargs

    def _run(self) -> Dict[str, Any]:
        from myx_agent.imports import allow_stdlib_ssl

        allow_stdlib_ssl()  # ansible_runner's dependencies may need it
        import ansible_runner  # lazily: it is heavy, and only runs need it

        kwargs = self._prepare()
        stats: Dict[str, Any] = {}
        call = self._reactor.callFromThread
        output = self._sink.output

        def event_handler(event: Dict[str, Any]) -> bool:
            text = event.get("stdout")
            if text:
                data = (text.replace("\r\n", "\n") + "\n").encode("utf-8", "replace")
                call(output, STDOUT, data)
            if event.get("event") == "playbook_on_stats":
                data_ = event.get("event_data") or {}
                for key in STATS_KEYS:
                    stats[key] = data_.get(key, {})
            # Our stream is the log; no per-event JSON files in the artifacts.
            return False

        try:
            runner = ansible_runner.run(
                private_data_dir=self.private_data_dir,
                project_dir=self.deployment_tool_dir,
                playbook=self.playbook_path,
                event_handler=event_handler,
                cancel_callback=self._cancel.is_set,
                quiet=True,
                rotate_artifacts=1,
                suppress_env_files=True,
                # Fixed words, never caller input: extra_vars stay in env/extravars.
                cmdline="--check --diff" if self.check else None,
                **kwargs,
            )
        finally:
            try:
                os.unlink(os.path.join(self.private_data_dir, "env", "extravars"))
            except OSError:
                pass
        return {"status": runner.status, "rc": runner.rc, "stats": stats}

    # -- killing (reactor thread) -------------------------------------------

    def terminate(self) -> None:
        if self._terminated:
            return
        self._terminated = True
        self._cancel.set()
        self._kill_pass(signal.SIGTERM, passes_left=0)

        def kill() -> None:
            self._kill_pass(signal.SIGKILL, passes_left=self.KILL_PASSES)

        self._timers.kill_later(self._kill_grace, kill)

    def _kill_pass(self, sig: int, passes_left: int) -> None:
        pids = proc.pids_with_env_marker(MARKER_ENV, self.marker)
        hit = proc.signal_pids(pids, sig)
        if hit:
            self._log.info(
                "ansible run {command_id}: sent signal {sig} to {count} processes",
                command_id=self.command_id,
                sig=int(sig),
                count=hit,
            )
        if hit and passes_left > 1:
            self._timers.call_later(0.2, self._kill_pass, sig, passes_left - 1)

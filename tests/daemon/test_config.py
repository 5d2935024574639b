"""Settings: defaults, TOML file, flags, and every way a config can be wrong."""

from __future__ import annotations

import dataclasses
import os
import stat
from typing import Any, cast

from twisted.python import usage
from twisted.trial import unittest

from myxd.config import Settings, field_names, flag_name, load_settings
from myxd.errors import ConfigError
from myxd.install.bundle import packaged_deployment_tool_dir
from myxd.tap import ADMIN_TOKEN_FILE_NAME, Options, ensure_admin_token, prepare_data_dir

# A valid non-default value for every field, to prove each has a flag and a key.
SAMPLE: dict[str, Any] = {
    "data_dir": "/srv/myxd",
    "api": "tcp:0:interface=127.0.0.1",
    "admin_token": "a-very-long-admin-token-123",
    "heartbeat_min_interval": 0.25,
    "heartbeat_max_interval": 75.5,
    "heartbeat_concurrency": 17,
    "rpc_retry_max_attempts": 5,
    "rpc_retry_base_delay": 0.5,
    "rpc_timeout": 4.5,
    "rpc_pool_idle_timeout": 90.0,
    "rpc_pool_max_per_host": 3,
    "log_poll_interval": 0.2,
    "log_poll_wait": 2.5,
    "max_log_pollers": 33,
    "reinstall_after_cycles": 7,
    "install_concurrency": 2,
    "ssh_connect_timeout": 3.5,
    "ssh_command_timeout": 60.0,
    "agent_start_timeout": 30.0,
    "install_dependency_mode": "index",
    # Checked at start: it must be a real deployment tool (the packaged one is).
    "deployment_tool_dir": packaged_deployment_tool_dir(),
    "log_level": "debug",
    "artifact_max_bytes": 1048576,
    "deployment_timeout": 600.0,
    "log_unreachable_limit": 300.0,
    "allowed_target_networks": "127.0.0.0/8, ::1/128",
}


def toml_value(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value + '"'
    return repr(value)


class DefaultsTests(unittest.TestCase):
    def test_architecture_defaults(self) -> None:
        s = Settings()
        self.assertEqual(
            (
                s.data_dir,
                s.api,
                s.admin_token,
                s.heartbeat_min_interval,
                s.heartbeat_max_interval,
                s.rpc_retry_max_attempts,
                s.rpc_retry_base_delay,
                s.rpc_timeout,
                s.log_poll_interval,
            ),
            ("./myxd-data", "tcp:8470:interface=127.0.0.1", None, 20, 60, 3, 1, 30, 1),
        )
        self.assertLess(s.rpc_pool_idle_timeout, 180)
        self.assertLessEqual(s.log_poll_wait, 30)

    def test_sample_covers_every_field(self) -> None:
        self.assertEqual(sorted(SAMPLE), sorted(field_names()))
        for name, value in SAMPLE.items():
            self.assertNotEqual(getattr(Settings(), name), value, name)

    def test_admin_token_not_in_repr(self) -> None:
        self.assertNotIn("a-very-long", repr(Settings(admin_token=SAMPLE["admin_token"])))


class OptionsTests(unittest.TestCase):
    def parse(self, *argv: str) -> Settings:
        options = Options()
        options.parseOptions(list(argv))
        settings = options["settings"]
        self.assertIsInstance(settings, Settings)
        return settings

    def test_no_flags(self) -> None:
        self.assertEqual(self.parse(), Settings())

    def test_documented_flags(self) -> None:
        s = self.parse("--data-dir", "/tmp/x", "--api", "tcp:0:interface=127.0.0.1")
        self.assertEqual((s.data_dir, s.api), ("/tmp/x", "tcp:0:interface=127.0.0.1"))

    def test_every_field_is_a_flag(self) -> None:
        for name, value in SAMPLE.items():
            s = self.parse(f"--{flag_name(name)}", str(value))
            self.assertEqual(getattr(s, name), value, name)
            self.assertIs(type(getattr(s, name)), type(value), name)

    def test_all_flags_at_once(self) -> None:
        argv: list[str] = []
        for name, value in SAMPLE.items():
            argv += [f"--{flag_name(name)}", str(value)]
        self.assertEqual(self.parse(*argv), Settings(**SAMPLE))

    def test_help_lists_flags(self) -> None:
        text = str(Options())
        for name in field_names():
            self.assertIn(f"--{flag_name(name)}", text)
        self.assertIn("--config", text)
        self.assertIn("tcp:8470:interface=127.0.0.1", text)

    def test_bad_flag_is_usage_error(self) -> None:
        cases = [
            (["--heartbeat-min-interval", "abc"], "--heartbeat-min-interval: expected a number"),
            (["--heartbeat-min-interval", "nan"], "--heartbeat-min-interval: expected a number"),
            (["--rpc-timeout", "inf"], "--rpc-timeout: expected a number"),
            (["--heartbeat-concurrency", "2.5"], "--heartbeat-concurrency: expected an integer"),
            (["--rpc-timeout", "0"], "--rpc-timeout: must be greater than 0"),
            (["--max-log-pollers", "-3"], "--max-log-pollers: must be greater than 0"),
            (
                ["--heartbeat-min-interval", "90"],
                "--heartbeat-min-interval: heartbeat_min_interval (90) is greater than "
                "heartbeat_max_interval (60)",
            ),
            (
                ["--heartbeat-max-interval", "5"],
                "--heartbeat-max-interval: heartbeat_min_interval (20) is greater than "
                "heartbeat_max_interval (5)",
            ),
            (["--rpc-pool-idle-timeout", "180"], "--rpc-pool-idle-timeout: must be below"),
            (["--log-poll-wait", "31"], "--log-poll-wait: must be at most 30"),
            (["--rpc-retry-max-attempts", "-1"], "--rpc-retry-max-attempts: must be at least 0"),
            (["--admin-token", "short"], "--admin-token: must be at least 16"),
            (["--admin-token", "has spaces in it, sadly"], "--admin-token: must be printable"),
            (["--data-dir", " "], "--data-dir: must not be empty"),
            (["--api", "nonsense:1"], "--api: not a valid endpoint"),
            (["--config", "/nonexistent/myxd.toml"], "/nonexistent/myxd.toml: cannot read"),
        ]
        for argv, expected in cases:
            with self.assertRaises(usage.UsageError, msg=str(argv)) as e:
                Options().parseOptions(argv)
            message = str(e.exception)
            self.assertIn(expected, message, argv)
            self.assertNotIn("\n", message, argv)

    def test_min_max_message_when_both_from_flags(self) -> None:
        with self.assertRaises(usage.UsageError) as e:
            Options().parseOptions(
                ["--heartbeat-min-interval", "5", "--heartbeat-max-interval", "4"]
            )
        self.assertEqual(
            str(e.exception),
            "--heartbeat-max-interval: heartbeat_min_interval (5)"
            " is greater than heartbeat_max_interval (4)",
        )

    def test_equal_min_max_allowed(self) -> None:
        s = self.parse("--heartbeat-min-interval", "0.5", "--heartbeat-max-interval", "0.5")
        self.assertEqual((s.heartbeat_min_interval, s.heartbeat_max_interval), (0.5, 0.5))

    def test_unknown_flag(self) -> None:
        with self.assertRaises(usage.UsageError):
            Options().parseOptions(["--heartbeat-interval", "5"])


class TomlTests(unittest.TestCase):
    def write(self, text: str) -> str:
        path = os.path.abspath(self.mktemp()) + ".toml"
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def fails(self, text: str, *expected: str, overrides: dict[str, object] | None = None) -> str:
        path = self.write(text)
        with self.assertRaises(ConfigError) as e:
            load_settings(path, overrides or {})
        message = str(e.exception)
        self.assertNotIn("\n", message)
        for part in expected:
            self.assertIn(part.replace("FILE", path), message)
        return message

    def test_every_field_is_a_key(self) -> None:
        text = "".join(f"{name} = {toml_value(value)}\n" for name, value in SAMPLE.items())
        self.assertEqual(load_settings(self.write(text), {}), Settings(**SAMPLE))

    def test_int_accepted_for_float(self) -> None:
        s = load_settings(self.write("rpc_timeout = 5\n"), {})
        self.assertEqual(s.rpc_timeout, 5.0)
        self.assertIs(type(s.rpc_timeout), float)

    def test_flags_override_file(self) -> None:
        path = self.write("rpc_timeout = 5\nheartbeat_min_interval = 1\n")
        s = load_settings(path, {"rpc_timeout": "7", "heartbeat_min_interval": None})
        self.assertEqual((s.rpc_timeout, s.heartbeat_min_interval), (7.0, 1.0))
        options = Options()
        options.parseOptions(["--config", path, "--rpc-timeout", "9"])
        self.assertEqual(options["settings"].rpc_timeout, 9.0)
        self.assertEqual(options["settings"].heartbeat_min_interval, 1.0)

    def test_empty_file(self) -> None:
        self.assertEqual(load_settings(self.write(""), {}), Settings())

    def test_unknown_key(self) -> None:
        message = self.fails("heartbeat_interval = 5\n", "FILE: unknown key 'heartbeat_interval'")
        self.assertIn("did you mean", message)
        self.fails("[myxd]\nrpc_timeout = 5\n", "FILE: unknown key 'myxd'")
        self.fails("rpc-timeout = 5\n", "FILE: unknown key 'rpc-timeout'")

    def test_wrong_types(self) -> None:
        self.fails('rpc_timeout = "fast"\n', "FILE: rpc_timeout: expected a number, got 'fast'")
        self.fails("rpc_timeout = true\n", "FILE: rpc_timeout: expected a number, got true")
        self.fails("rpc_timeout = nan\n", "FILE: rpc_timeout: expected a number")
        self.fails("rpc_timeout = inf\n", "FILE: rpc_timeout: expected a number")
        self.fails(
            "heartbeat_concurrency = 2.5\n",
            "FILE: heartbeat_concurrency: expected an integer, got 2.5",
        )
        self.fails(
            "heartbeat_concurrency = false\n",
            "FILE: heartbeat_concurrency: expected an integer, got false",
        )
        self.fails(
            'heartbeat_concurrency = "10"\n', "FILE: heartbeat_concurrency: expected an integer"
        )
        self.fails("data_dir = 5\n", "FILE: data_dir: expected a string, got 5")
        self.fails("api = [1, 2]\n", "FILE: api: expected a string, got an array")
        self.fails("admin_token = {a = 1}\n", "FILE: admin_token: expected a string, got a table")

    def test_non_positive_values(self) -> None:
        for name, value in SAMPLE.items():
            if isinstance(value, (int, float)):
                # Zero retries is a valid choice (fail on the first error), and
                # a zero log_poll_wait is the architecture's plain polling.
                zero_ok = name in ("rpc_retry_max_attempts", "log_poll_wait")
                for bad in (-1,) if zero_ok else (0, -1):
                    self.fails(f"{name} = {bad}\n", f"FILE: {name}: must be")

    def test_min_greater_than_max(self) -> None:
        self.fails(
            "heartbeat_min_interval = 10\nheartbeat_max_interval = 5\n",
            "FILE: heartbeat_min_interval (10) is greater than heartbeat_max_interval (5)",
        )
        self.fails(
            "heartbeat_min_interval = 100\n",
            "FILE: heartbeat_min_interval (100) is greater than heartbeat_max_interval (60)",
        )
        # The flag that broke the relation is the one named.
        self.fails(
            "heartbeat_min_interval = 10\n",
            "--heartbeat-max-interval: heartbeat_min_interval (10) is greater than "
            "heartbeat_max_interval (5)",
            overrides={"heartbeat_max_interval": "5"},
        )

    def test_other_ranges(self) -> None:
        self.fails("rpc_pool_idle_timeout = 200\n", "FILE: rpc_pool_idle_timeout: must be below")
        self.fails("log_poll_wait = 45\n", "FILE: log_poll_wait: must be at most 30")
        self.fails('admin_token = "tiny"\n', "FILE: admin_token: must be at least 16")
        self.fails('data_dir = ""\n', "FILE: data_dir: must not be empty")
        self.fails('api = ""\n', "FILE: api: must not be empty")
        self.fails(
            'install_dependency_mode = "magic"\n',
            "FILE: install_dependency_mode: must be one of wheelhouse, index",
        )

    def test_not_toml(self) -> None:
        self.fails("rpc_timeout = = 5\n", "FILE: not valid TOML")
        self.fails("rpc_timeout = 5\nrpc_timeout = 6\n", "FILE: not valid TOML")

    def test_missing_file(self) -> None:
        path = os.path.abspath(self.mktemp())
        with self.assertRaises(ConfigError) as e:
            load_settings(path, {})
        self.assertIn(f"{path}: cannot read config file", str(e.exception))

    def test_unknown_override(self) -> None:
        with self.assertRaises(ConfigError) as e:
            load_settings(None, {"bogus": "1"})
        self.assertIn("unknown key 'bogus'", str(e.exception))

    def test_bad_file_via_options(self) -> None:
        path = self.write("heartbeat_concurrency = 0\n")
        with self.assertRaises(usage.UsageError) as e:
            Options().parseOptions(["--config", path])
        self.assertEqual(
            str(e.exception), f"{path}: heartbeat_concurrency: must be greater than 0, got 0"
        )

    def test_settings_frozen(self) -> None:
        with self.assertRaises(dataclasses.FrozenInstanceError):
            Settings().rpc_timeout = 3  # type: ignore[misc]


class DataDirTests(unittest.TestCase):
    def test_prepare_data_dir(self) -> None:
        path = os.path.abspath(self.mktemp())
        self.assertEqual(prepare_data_dir(path), path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o700)
        os.chmod(path, 0o755)  # noqa: S103 - proving it gets tightened
        prepare_data_dir(path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o700)

    def test_admin_token_created_once_path_logged_once(self) -> None:
        from twisted.logger import ILogObserver, Logger, formatEvent

        data_dir = prepare_data_dir(os.path.abspath(self.mktemp()))
        events: list[dict[str, Any]] = []
        log = Logger(observer=cast(ILogObserver, events.append))
        token = ensure_admin_token(data_dir, log)
        path = os.path.join(data_dir, ADMIN_TOKEN_FILE_NAME)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path) as f:
            self.assertEqual(f.read().strip(), token)
        self.assertGreaterEqual(len(token), 32)
        self.assertEqual(len(events), 1)
        # The journal gets the path, never the token (docs/security.md).
        self.assertNotIn(token, formatEvent(events[0]))
        self.assertIn(path, formatEvent(events[0]))
        self.assertEqual(ensure_admin_token(data_dir, log), token)
        self.assertEqual(len(events), 1)  # not logged again

    def test_admin_token_file_too_short(self) -> None:
        data_dir = prepare_data_dir(os.path.abspath(self.mktemp()))
        with open(os.path.join(data_dir, ADMIN_TOKEN_FILE_NAME), "w") as f:
            f.write("abc\n")
        with self.assertRaises(ConfigError):
            ensure_admin_token(data_dir)

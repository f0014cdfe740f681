"""``credbroker warm``/``events`` argument rules and the worker pool defaults."""

from __future__ import annotations

import pytest

from broker.settings import load_settings
from workers import cli, cli_procs


def parse(*argv: str):  # type: ignore[no-untyped-def]
    return cli.build_parser().parse_args(list(argv))


def test_worker_defaults_to_threads_sized_for_waiting() -> None:
    s = load_settings({}, env_file=None)
    argv = cli_procs.worker_argv(parse("worker"), s)
    assert {"--pool=threads", "--concurrency=64"} <= set(argv)
    argv = cli_procs.worker_argv(parse("worker", "--pool", "prefork"), s)
    assert "--pool=prefork" in argv and not any(a.startswith("--concurrency") for a in argv)
    assert "--concurrency=8" in cli_procs.worker_argv(parse("worker", "-c", "8"), s)


def test_warm_needs_exactly_one_of_user_or_all_users() -> None:
    assert parse("warm", "--user", "alice").user == "alice"
    args = parse("warm", "--all-users", "--server", "tx", "--server", "obo", "--window", "8")
    assert args.all_users and args.server == ["tx", "obo"] and args.window == 8
    for bad in (["warm"], ["warm", "--user", "a", "--all-users"], ["warm", "--all-users", "--window", "0"]):
        with pytest.raises(SystemExit):
            parse(*bad)


def test_events_options() -> None:
    args = parse("events", "--follow", "--after", "12", "--json")
    assert args.follow and args.after == 12 and args.json

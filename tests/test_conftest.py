"""The suite's own rule, proved on inner test files: every async test is bounded by
`trio.fail_after` (`conftest.TEST_DEADLINE`, or its `@pytest.mark.deadline`), on the test's
clock, parametrized or not, and so are its fixtures (plus `conftest.FIXTURES_ALLOWANCE`).

Each test runs an inner pytest session under this suite's deadline hooks and reads why
each inner test failed. An inner test that should be cut short sleeps for longer than
any bound here (`LONG`), not forever, so that a bound that fails to fire fails these tests
rather than hanging them; the first one sleeps forever, in a child process with a timeout."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from . import conftest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]  # where `tests.conftest` imports from
OURS = "ran past its deadline of"  # the note the body's bound adds to its TooSlowError
LONG = 10  # seconds an inner test sleeps that its bound must cut short
HOOKS = ["pytest_configure", "pytest_collection_modifyitems", "pytest_runtest_call"]


def leaves(error: BaseException) -> Iterator[BaseException]:
    """The exceptions in `error`, out of any groups (pytest-trio raises from a nursery)."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from leaves(inner)
    else:
        yield error


def inner_suite(pytester: pytest.Pytester, source: str) -> None:
    """`source` as a test file, trio_mode on, under this suite's deadline hooks: those
    alone, not its fixtures (its session fixture would point the daemon's log at the inner
    session's stdout, closed once that session ends)."""
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makeconftest(f"from tests.conftest import {', '.join(HOOKS)}  # noqa: F401")
    pytester.makepyfile(test_inner=source.replace("LONG", str(LONG)))


def run_inner(pytester: pytest.Pytester, source: str) -> dict[str, BaseException | None]:
    """Run `source` (`inner_suite`) in this process: each test's id and what its call
    raised (None: it passed)."""
    inner_suite(pytester, source)
    recorded = pytester.inline_run("-p", "no:cacheprovider")
    raised: dict[str, BaseException | None] = {}
    for report in recorded.getcalls("pytest_runtest_makereport"):
        if report.call.when in ("setup", "call"):
            excinfo = report.call.excinfo
            if excinfo is not None or report.call.when == "call":
                raised.setdefault(report.item.name, None if excinfo is None else excinfo.value)
    return raised


def too_slow(error: BaseException | None) -> trio.TooSlowError:
    """The one TooSlowError `error` is (or holds); fails if it is anything else."""
    assert error is not None, "the test passed"
    errors = list(leaves(error))
    assert [type(e) for e in errors] == [trio.TooSlowError], errors
    found = errors[0]
    assert isinstance(found, trio.TooSlowError)
    return found


def notes(error: BaseException) -> str:
    return "\n".join(getattr(error, "__notes__", ()))


def test_a_test_that_never_ends_fails_with_too_slow_at_its_marker_deadline(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """sleep_forever under `deadline(0.2)` fails with TooSlowError from the bound, promptly
    (not after TEST_DEADLINE); a test that finishes within its marker passes. In a child
    process, so that a bound that never fires fails this test (TimeoutExpired) instead of
    hanging it."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    inner_suite(pytester, """
        import pytest, trio

        @pytest.mark.deadline(0.2)
        async def test_forever():
            await trio.sleep_forever()

        @pytest.mark.deadline(5)
        async def test_quick():
            await trio.sleep(0.01)
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider",
                                           timeout=conftest.TEST_DEADLINE / 2)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*trio.TooSlowError*", f"*test_forever {OURS} 0.2 s*",
                                 "FAILED test_inner.py::test_forever - *TooSlowError*"])


def test_an_unmarked_test_gets_the_default_deadline(pytester: pytest.Pytester,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a marker the bound is `TEST_DEADLINE` (made short here)."""
    monkeypatch.setattr(conftest, "TEST_DEADLINE", 0.2)
    raised = run_inner(pytester, """
        import trio

        async def test_long():
            await trio.sleep(LONG)
    """)
    assert f"{OURS} 0.2 s" in notes(too_slow(raised["test_long"]))


def test_on_a_virtual_clock_the_bound_is_virtual(pytester: pytest.Pytester) -> None:
    """With `autojump_clock` the deadline is virtual: a long virtual sleep within it passes,
    and one past it fails at once (a day of virtual sleep under the default bound)."""
    raised = run_inner(pytester, """
        import pytest, trio

        @pytest.mark.deadline(100)
        async def test_within(autojump_clock):
            await trio.sleep(99)
            assert trio.current_time() == 99

        async def test_a_day(autojump_clock):
            await trio.sleep(86400)
    """)
    assert raised["test_within"] is None
    assert OURS in notes(too_slow(raised["test_a_day"]))


def test_parametrized_tests_and_fixtures_keep_working_each_bounded_alone(
        pytester: pytest.Pytester) -> None:
    """Each parametrization is bounded by its own marker and still gets its async fixture's
    value and its parameter."""
    raised = run_inner(pytester, """
        import pytest, trio

        @pytest.fixture
        async def value():
            await trio.sleep(0)
            yield 41

        @pytest.mark.parametrize("n", [1, pytest.param(2, marks=pytest.mark.deadline(0.2)), 3])
        async def test_each(value, n):
            assert value == 41
            if n == 2:
                await trio.sleep(LONG)
    """)
    assert raised.keys() == {"test_each[1]", "test_each[2]", "test_each[3]"}
    assert raised["test_each[1]"] is None and raised["test_each[3]"] is None
    assert f"{OURS} 0.2 s" in notes(too_slow(raised["test_each[2]"]))


def test_a_hypothesis_test_is_bounded_per_example(pytester: pytest.Pytester) -> None:
    """An async Hypothesis test runs each example under the bound."""
    raised = run_inner(pytester, """
        import pytest, trio
        from hypothesis import Phase, given, settings, strategies as st

        @pytest.mark.deadline(0.2)
        @settings(max_examples=3, deadline=None, database=None, phases=[Phase.generate])
        @given(st.integers())
        async def test_long(i):  # not shrunk: each retry would wait out the bound again
            await trio.sleep(LONG)

        @pytest.mark.deadline(0.2)
        @settings(max_examples=5, deadline=None, database=None)
        @given(st.integers())
        async def test_quick(i):
            await trio.sleep(0.05)  # five examples: 0.25 s in all, each within its bound
    """)
    assert OURS in notes(too_slow(raised["test_long"]))
    assert raised["test_quick"] is None


def test_a_fixture_that_never_finishes_setting_up_is_bounded_too(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fixture stuck in its setup (a daemon that never reports ready) fails the test
    with TooSlowError after the deadline plus FIXTURES_ALLOWANCE (made short here)."""
    monkeypatch.setattr(conftest, "FIXTURES_ALLOWANCE", 0.2)
    raised = run_inner(pytester, """
        import pytest, trio

        @pytest.fixture
        async def never_ready():
            await trio.sleep(LONG)
            yield

        @pytest.mark.deadline(0.1)
        async def test_it(never_ready):
            pass
    """)
    assert "ran past 0.3 s" in notes(too_slow(raised["test_it"]))


def test_a_tests_own_fail_after_keeps_its_meaning(pytester: pytest.Pytester) -> None:
    """A TooSlowError from a test's own fail_after is not taken for the suite's bound."""
    raised = run_inner(pytester, """
        import trio

        async def test_own():
            with trio.fail_after(0.05):
                await trio.sleep(LONG)
    """)
    assert notes(too_slow(raised["test_own"])) == ""

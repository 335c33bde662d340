"""Reading a listed row and a day file leniently (`reconcile/rows.py`,
`reconcile/export_file.py`): every field of the wrong shape is named, never a crash."""

from __future__ import annotations

import datetime as dt
import gzip
import zlib

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from msgledger.reconcile.compare import Day
from msgledger.reconcile.export_file import DayFile, lines_of
from msgledger.reconcile.rows import Broken, Listed, from_api, from_export

SID = "SM" + "a" * 32


def test_a_page_row_is_read_with_its_rfc_2822_dates() -> None:
    row = from_api({"sid": SID, "status": "delivered", "to": "+1555867XXXX", "from": "+1500",
                    "error_code": None, "direction": "outbound-api", "price": "-0.0079",
                    "date_created": "Thu, 30 Jul 2015 20:12:31 +0000",
                    "date_sent": "Fri, 31 Jul 2015 01:12:31 -0500"})
    assert isinstance(row, Listed) and row.problems == ()
    assert (row.date_created, row.date_sent) == ("2015-07-30T20:12:31.000000+00:00",
                                                 "2015-07-31T06:12:31.000000+00:00")
    assert row.reported()["listed"]["price"] == "-0.0079" and row.outbound


def test_an_export_line_reads_error_code_0_as_none() -> None:
    row = from_export({"sid": SID, "status": "failed", "error_code": 0, "direction": "inbound",
                       "date_sent": "2026-11-27T12:00:00Z",
                       "date_created": "2026-11-27T11:59:59+01:00"})
    assert isinstance(row, Listed)
    assert (row.error_code, row.outbound) == (None, False)
    assert (row.date_sent, row.date_created) == ("2026-11-27T12:00:00.000000+00:00",
                                                 "2026-11-27T10:59:59.000000+00:00")
    assert from_export({"sid": SID, "error_code": 30003}).error_code == 30003  # type: ignore[union-attr]


@pytest.mark.parametrize("date_sent", ["Thu, 31 Feb 2015 20:12:31 +0000",
                                       "Thu, 30 Jul 2015 24:00:00 +0000", "yesterday", "",
                                       "2026-02-30T12:00:00Z"])
def test_a_date_that_is_no_date_is_a_problem_not_a_crash(date_sent: str) -> None:
    row = from_api({"sid": SID, "date_sent": date_sent})
    exported = from_export({"sid": SID, "date_sent": date_sent})
    assert isinstance(row, Listed) and isinstance(exported, Listed)
    assert row.date_sent is None and exported.date_sent is None
    expected = () if date_sent == "" else ("date_sent",)
    assert row.problems == expected and exported.problems == expected


def test_fields_of_the_wrong_type_are_named() -> None:
    row = from_api({"sid": SID, "status": ["delivered"], "to": 5, "error_code": "x",
                    "date_created": 17, "extra": {"kept": True}})
    assert isinstance(row, Listed)
    assert set(row.problems) == {"status", "to", "error_code", "date_created"}
    assert row.reported()["listed"]["extra"] == {"kept": True}


@pytest.mark.parametrize("item", [[], "SM", None, {"sid": 5}, {"sid": "SMxyz"}, {}])
def test_a_row_without_a_sid_is_broken(item: object) -> None:
    assert isinstance(from_api(item), Broken)


@given(st.dictionaries(st.sampled_from(["sid", "status", "to", "from", "date_sent",
                                        "date_created", "error_code", "direction", "body"]),
                       st.none() | st.text() | st.integers() | st.booleans()
                       | st.lists(st.text(), max_size=2)))
def test_no_row_raises(item: dict[str, object]) -> None:
    for read in (from_api, from_export):
        assert isinstance(read({**item, "sid": SID}), Listed)
        assert isinstance(read(item), Listed | Broken)


def test_a_day_file_is_read_in_batches_across_gzip_members() -> None:
    lines = [orjson.dumps({"sid": f"SM{i:032x}", "status": "sent"}) for i in range(5)]
    data = gzip.compress(b"\n".join(lines[:2]) + b"\n") + gzip.compress(
        b"\n".join(lines[2:]) + b"\n\n{broken\n")
    chunks = [data[i:i + 7] for i in range(0, len(data), 7)]  # cut anywhere
    day = DayFile(chunks)
    first, second, last = day.batch(3), day.batch(3), day.batch(3)
    assert [r["sid"] for r in first] == [f"SM{i:032x}" for i in range(3)]  # type: ignore[index]
    assert len(second) == 3 and isinstance(second[-1], Broken) and last == []
    assert "not JSON" in second[-1].why
    assert day.lines == 7  # the blank line counts as read


def test_a_download_begun_again_skips_what_was_compared() -> None:
    data = gzip.compress(b"".join(orjson.dumps({"sid": f"SM{i:032x}"}) + b"\n"
                                  for i in range(4)))
    rows = DayFile([data], skip=3).batch(10)
    assert rows == [{"sid": f"SM{3:032x}"}]


def test_a_file_cut_short_or_not_gzip_raises() -> None:
    data = gzip.compress(b'{"sid": "x"}\n' * 100)
    with pytest.raises(zlib.error):
        list(lines_of([data[:len(data) // 2]]))
    with pytest.raises(zlib.error):
        list(lines_of([b"not gzip at all"]))


def test_twilio_s_own_date_forms_are_known_without_parsing() -> None:
    """The comparison's shortcut for rows the store already holds reads only Twilio's two
    exact UTC forms on the day; anything else is left to the full reading."""
    day = Day(dt.date(2026, 11, 27))
    assert day.exactly_on("2026-11-27T23:59:59Z")
    assert day.exactly_on("Fri, 27 Nov 2026 00:00:00 +0000")
    for other in ("2026-11-28T00:00:00Z", "2026-11-27T23:30:00-05:00", "2026-11-27",
                  "Fri, 27 Nov 2026 20:00:00 -0500", "Sat, 28 Nov 2026 00:00:00 +0000",
                  "2026-11-27T24:00:00Z", "2026-11-27Tab:cd:efZ",
                  "Fri, 27 Nov 2026 99:99:99 +0000",
                  None, 20261127, ["2026-11-27T12:00:00Z"]):
        assert not day.exactly_on(other)

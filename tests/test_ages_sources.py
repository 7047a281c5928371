"""Age sources: file names, the ages file, NAME=AGE pairs, EXIF dates with a birth date."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from selfage_cli.ages.engine import sources
from selfage_cli.ages.engine.sources import ExifDateError, age_at, age_from_exif, age_from_filename, parse_ages_file
from selfage_cli.errors import SelfageError

# ---- file names -------------------------------------------------------------------------------------------
_rest = st.text(alphabet=st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), max_size=20)
_ext = st.sampled_from([".jpg", ".JPG", ".png", ".jpeg", ".webp", ""])


@given(
    age=st.integers(0, 100),
    zeros=st.integers(0, 2),
    rest=_rest,
    ext=_ext,
    folder=st.sampled_from(["", "photos/", "/abs/12_x/", "50_dir/"]),
)
def test_filename_age_is_read_from_the_leading_digits(age, zeros, rest, ext, folder):
    digits = str(age).zfill(min(3, len(str(age)) + zeros))  # leading zeros, at most 3 digits in all
    assert age_from_filename(f"{folder}{digits}_{rest}{ext}") == age


@given(age=st.integers(101, 999), rest=_rest, ext=_ext)
def test_filename_numbers_above_100_are_not_ages(age, rest, ext):
    assert age_from_filename(f"{age}_{rest}{ext}") is None


@given(year=st.integers(1000, 99999), rest=_rest)
def test_years_and_long_numbers_are_not_ages(year, rest):
    assert age_from_filename(f"{year}_{rest}.jpg") is None


@given(name=st.text(alphabet=st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), max_size=30))
def test_names_not_starting_with_digits_then_underscore_have_no_age(name):
    stripped = name.lstrip("0123456789")
    if stripped.startswith("_") and 1 <= len(name) - len(stripped) <= 3:
        return  # that is the convention
    assert age_from_filename(name + ".png") is None


@pytest.mark.parametrize(
    ("name", "age"),
    [
        ("34_beach.jpg", 34),
        ("034_x.png", 34),
        ("0_baby.png", 0),
        ("100_x.jpg", 100),
        ("34_.jpg", 34),
        ("34_my.photo.jpg", 34),
        ("34.jpg", None),
        ("34-beach.jpg", None),
        ("x_34.jpg", None),
        ("-5_x.jpg", None),
        (" 34_x.jpg", None),
        ("٣٤_x.jpg", None),
        ("2019_trip.jpg", None),
        ("101_x.jpg", None),
        ("photos/7_a.png", 7),
        ("40_folder/beach.jpg", None),
    ],
)
def test_filename_examples(name, age):
    assert age_from_filename(name) == age


# ---- ages file and pairs -------------------------------------------------------------------------------------
def test_ages_file_with_header_comments_and_quotes(tmp_path):
    path = tmp_path / "ages.csv"
    path.write_text('\ufeffname,age\n# a comment\n\nme_2010.jpg, 20\n"me, at 30.jpg",30\nbaby,0\n', encoding="utf-8")
    assert parse_ages_file(path) == {"me_2010.jpg": 20, "me, at 30.jpg": 30, "baby": 0}


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("a.jpg,20\nb.jpg,twenty\n", 2, "'twenty' is not an age"),
        ("a.jpg,20\n\n# c\nb.jpg,101\n", 4, "age 101 is outside 0–100"),
        ("a.jpg,20\nb.jpg,-3\n", 2, "'-3' is not an age"),
        ("a.jpg,20\nb.jpg,34.5\n", 2, "'34.5' is not an age"),
        ("a.jpg\n", 1, "expected 'name,age' (two fields), found 1"),
        ("a.jpg,20,x\n", 1, "found 3"),
        ("name,age\n,20\n", 2, "the name is empty"),
        ("a.jpg,20\nb.jpg,30\na.jpg,21\n", 3, "already given age 20"),
    ],
)
def test_ages_file_errors_name_the_line(tmp_path, text, line, fragment):
    path = tmp_path / "ages.csv"
    path.write_text(text)
    with pytest.raises(SelfageError) as info:
        parse_ages_file(path)
    message = str(info.value)
    assert f"{path} line {line}:" in message and fragment in message


def test_ages_file_missing_or_empty(tmp_path):
    with pytest.raises(SelfageError, match="no such file"):
        parse_ages_file(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("name,age\n\n")
    with pytest.raises(SelfageError, match="holds no 'name,age' lines"):
        parse_ages_file(tmp_path / "empty.csv")


def test_pairs():
    assert sources.parse_pairs(["me.jpg=30", "a=b.jpg=4"]) == {"me.jpg": 30, "a=b.jpg": 4}
    with pytest.raises(SelfageError, match="not NAME=AGE"):
        sources.parse_pairs(["me.jpg"])
    with pytest.raises(SelfageError, match="outside 0–100"):
        sources.parse_pairs(["me.jpg=130"])


# ---- EXIF arithmetic -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("birth", "taken", "age"),
    [
        ("1990-04-02", "2020-04-01", 29),  # the day before the birthday
        ("1990-04-02", "2020-04-02", 30),  # on the birthday
        ("1990-04-02", "2020-04-03", 30),
        ("1990-04-02", "1990-04-02", 0),  # the day of birth
        ("1990-12-31", "1991-01-01", 0),
        ("1990-01-01", "2020-12-31", 30),
        ("2000-02-29", "2001-02-28", 0),  # born on 29 February: not yet 1 on 28 February of a common year
        ("2000-02-29", "2001-03-01", 1),  # ... but on 1 March
        ("2000-02-29", "2004-02-28", 3),
        ("2000-02-29", "2004-02-29", 4),  # a leap year: the birthday itself
        ("1999-03-01", "2000-02-29", 0),
        ("1999-03-01", "2000-03-01", 1),
        ("1999-02-28", "2000-02-29", 1),
    ],
)
def test_age_at(birth, taken, age):
    assert age_at(dt.date.fromisoformat(birth), dt.date.fromisoformat(taken)) == age


def test_age_at_before_birth_is_an_error():
    with pytest.raises(ValueError):
        age_at(dt.date(2000, 1, 2), dt.date(2000, 1, 1))


def _photo_with_exif(path: Path, original: str | None = None, plain: str | None = None) -> Path:
    exif = Image.Exif()
    if plain is not None:
        exif[sources.TAG_DATETIME] = plain
    if original is not None:
        exif.get_ifd(sources.EXIF_IFD)[sources.TAG_DATETIME_ORIGINAL] = original
    Image.new("RGB", (16, 16), (90, 80, 70)).save(path, exif=exif)
    return path


def test_age_from_exif(tmp_path):
    both = _photo_with_exif(tmp_path / "both.jpg", original="2020:04:01 23:59:59", plain="2021:06:01 10:00:00")
    assert sources.exif_date(both) == dt.date(2020, 4, 1)  # DateTimeOriginal wins over DateTime
    assert age_from_exif(both, "1990-04-02") == 29
    assert age_from_exif(both, dt.date(1990, 4, 1)) == 30
    plain = _photo_with_exif(tmp_path / "plain.jpg", plain="2004:02:29 12:00:00")
    assert age_from_exif(plain, "2000-02-29") == 4
    none = _photo_with_exif(tmp_path / "none.png")
    assert age_from_exif(none, "2000-02-29") is None
    bad = _photo_with_exif(tmp_path / "bad.jpg", original="0000:00:00 00:00:00")
    with pytest.raises(ExifDateError, match="not a valid date"):
        age_from_exif(bad, "2000-01-01")
    with pytest.raises(SelfageError, match="before --birth-date"):
        age_from_exif(both, "2021-01-01")
    with pytest.raises(SelfageError, match="outside 0–100"):
        age_from_exif(both, "1900-01-01")
    with pytest.raises(SelfageError, match="YYYY-MM-DD"):
        sources.parse_birth_date("02/04/1990")

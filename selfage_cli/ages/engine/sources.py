"""Where an image's age can come from, besides DEX: an ages file or NAME=AGE pairs, the file name, EXIF.

* **ages file** (``--ages-file``): CSV lines ``name,age``; an optional ``name,age`` header, blank lines
  and ``#`` comments are allowed. ``name`` is a file name, a stem or an id.
* **NAME=AGE pairs** on the command line, same names.
* **file name**: the reference implementation's convention ``{age}_anything.ext`` (``34_beach.jpg``).
  Only a leading run of 1–3 ASCII digits followed by ``_`` counts, and only when it is 0–100, so
  ``2019_trip.jpg`` or ``500_px.jpg`` carry no age.
* **EXIF**: ``DateTimeOriginal`` (else ``DateTime``) with the person's birth date gives the age in
  whole years on the day the photo was taken.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import re
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from selfage_cli.errors import SelfageError

MIN_AGE = 0
MAX_AGE = 100


def check_age_list(values: list[Any], option: str = "--ages") -> list[int]:
    """A list of target ages: integers in MIN_AGE–MAX_AGE, each once, not empty (else SelfageError, exit 2)."""
    if not values:
        raise SelfageError(f"{option} is empty; give integers such as {option} 0,20,80.")
    seen: list[int] = []
    for age in values:
        if isinstance(age, bool) or not isinstance(age, int):
            raise SelfageError(f"{option}: {age!r} is not an integer; give integers such as {option} 0,20,80.")
        if not MIN_AGE <= age <= MAX_AGE:
            raise SelfageError(f"{option}: {age} is outside {MIN_AGE}–{MAX_AGE}; give ages in that range.")
        if age in seen:
            raise SelfageError(f"{option}: {age} is given twice; list each age once.")
        seen.append(age)
    return seen


def parse_age_list(value: str, option: str) -> list[int]:
    """``"0,20,80"`` → [0, 20, 80]: integer ages 0–100, each once, not empty (else exit 2); ``option`` names
    the option in the message (``--ages``, ``--validate-ages``)."""
    numbers: list[int] = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        try:
            numbers.append(int(part))
        except ValueError:
            raise SelfageError(
                f"{option}: {part!r} is not an integer; give integers such as {option} 0,20,80."
            ) from None
    return check_age_list(numbers, option)


EXIF_IFD = 0x8769
TAG_DATETIME_ORIGINAL = 36867
TAG_DATETIME = 306

_FILENAME_AGE = re.compile(r"^([0-9]{1,3})_")
_EXIF_DATE = re.compile(r"^\s*([0-9]{4})[:\-/.]([0-9]{1,2})[:\-/.]([0-9]{1,2})")


class ExifDateError(SelfageError):
    """A photo's EXIF date exists but cannot be read as a date."""


def check_age(value: int, where: str) -> int:
    """``value`` if it is within 0–100, else :class:`SelfageError` naming ``where``."""
    if not MIN_AGE <= value <= MAX_AGE:
        raise SelfageError(f"{where}: age {value} is outside {MIN_AGE}–{MAX_AGE}; give an age in that range.")
    return value


def parse_age(text: str, where: str) -> int:
    """A whole number of years 0–100 from text, else :class:`SelfageError` naming ``where``."""
    cleaned = text.strip()
    if not re.fullmatch(r"[+]?[0-9]+", cleaned):
        raise SelfageError(
            f"{where}: {text.strip()!r} is not an age; ages are whole numbers of years from {MIN_AGE} to {MAX_AGE}."
        )
    return check_age(int(cleaned), where)


# ---- file name ---------------------------------------------------------------------------------------
def age_from_filename(name: str | os.PathLike[str]) -> int | None:
    """The age encoded as ``{age}_anything.ext`` in a file's name, or None.

    Only the file's own name counts (not its folders). ``034_x.png`` is 34; ``2019_trip.jpg``,
    ``101_x.jpg``, ``34.jpg``, ``34-x.jpg`` and ``x_34.jpg`` have no age.
    """
    base = os.path.basename(os.fspath(name))
    match = _FILENAME_AGE.match(base)
    if not match:
        return None
    age = int(match.group(1))
    return age if MIN_AGE <= age <= MAX_AGE else None


# ---- ages file and NAME=AGE pairs --------------------------------------------------------------------
def parse_ages_file(path: str | os.PathLike[str]) -> dict[str, int]:
    """``name,age`` CSV → {name: age}. Errors name the file and the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SelfageError(f"--ages-file {path}: no such file; check the path.") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise SelfageError(
            f"--ages-file {path} cannot be read ({reason}); pass a UTF-8 CSV of name,age lines."
        ) from None
    ages: dict[str, int] = {}
    first_row = True
    reader = csv.reader(text.splitlines())
    for row in reader:
        line = reader.line_num
        cells = [cell.strip() for cell in row]
        if not cells or all(not c for c in cells) or cells[0].startswith("#"):
            continue
        where = f"--ages-file {path} line {line}"
        if first_row and len(cells) == 2 and cells[1].lower() == "age":
            first_row = False
            continue  # header
        first_row = False
        if len(cells) != 2:
            raise SelfageError(f"{where}: expected 'name,age' (two fields), found {len(cells)}; fix that line.")
        name, age_text = cells
        if not name:
            raise SelfageError(f"{where}: the name is empty; write 'name,age', e.g. 'me_2010.jpg,20'.")
        age = parse_age(age_text, where)
        if name in ages and ages[name] != age:
            raise SelfageError(
                f"{where}: {name!r} was already given age {ages[name]}, now {age}; keep one line per name."
            )
        ages[name] = age
    if not ages:
        raise SelfageError(f"--ages-file {path} holds no 'name,age' lines; add one line per photo.")
    return ages


def parse_pairs(pairs: list[str]) -> dict[str, int]:
    """``["me.jpg=30", …]`` → {name: age}; SelfageError for malformed pairs."""
    ages: dict[str, int] = {}
    for pair in pairs:
        name, sep, age_text = pair.rpartition("=")
        name = name.strip()
        if not sep or not name:
            raise SelfageError(f"{pair!r} is not NAME=AGE; write e.g. me_2010.jpg=20.")
        age = parse_age(age_text, f"NAME=AGE pair {pair!r}")
        if name in ages and ages[name] != age:
            raise SelfageError(f"NAME=AGE: {name!r} is given twice with different ages; give it once.")
        ages[name] = age
    return ages


# ---- EXIF --------------------------------------------------------------------------------------------
def parse_birth_date(text: str | dt.date | None) -> dt.date | None:
    """``--birth-date YYYY-MM-DD`` → date (None stays None)."""
    if text is None or isinstance(text, dt.date):
        return text
    try:
        return dt.date.fromisoformat(text.strip())
    except ValueError:
        raise SelfageError(f"--birth-date {text!r} is not a date; write it as YYYY-MM-DD, e.g. 1990-04-02.") from None


def age_at(birth: dt.date, taken: dt.date) -> int:
    """Age in whole years on ``taken`` of someone born on ``birth``.

    The age goes up on the birthday. Someone born on 29 February has their birthday on 1 March in
    years without one (28 February is still the day before). Raises ValueError when ``taken`` is
    before ``birth``.
    """
    if taken < birth:
        raise ValueError(f"{taken.isoformat()} is before the birth date {birth.isoformat()}")
    before_birthday = (taken.month, taken.day) < (birth.month, birth.day)
    return taken.year - birth.year - int(before_birthday)


def exif_date(path: str | os.PathLike[str]) -> dt.date | None:
    """The date a photo was taken from EXIF ``DateTimeOriginal`` (else ``DateTime``); None without one.

    Raises :class:`ExifDateError` when the tag is there but is not a valid date (e.g. ``0000:00:00``).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings(record=True) as damaged:
            warnings.simplefilter("always", UserWarning)  # Pillow's "Corrupt EXIF data": said below, in our words
            with Image.open(path) as image:
                exif = image.getexif()
                raw = exif.get_ifd(EXIF_IFD).get(TAG_DATETIME_ORIGINAL) or exif.get(TAG_DATETIME)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ExifDateError(f"{path}: cannot be read as an image to find its EXIF date ({exc}).") from None
    if raw is None and any(issubclass(w.category, UserWarning) for w in damaged):
        raise ExifDateError(
            f"{path}: its EXIF block is damaged, so no date could be read from it; give this photo's age another "
            "way (--ages-file, NAME=AGE, or the {age}_name file-name convention)."
        )
    if raw is None:
        return None
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", errors="replace")
    text = str(raw).strip("\x00 ")
    if not text:
        return None
    match = _EXIF_DATE.match(text)
    try:
        if not match:
            raise ValueError(text)
        return dt.date(int(match.group(1)), int(match.group(2)), int(match.group(3)))
    except ValueError:
        raise ExifDateError(
            f"{path}: the EXIF date {text!r} is not a valid date; give this photo's age another way "
            "(--ages-file, NAME=AGE, or the {age}_name file-name convention)."
        ) from None


def age_from_exif(path: str | os.PathLike[str], birth_date: dt.date | str) -> int | None:
    """Age on the day the photo was taken, from its EXIF date and the birth date; None without an EXIF date.

    Raises :class:`ExifDateError` for an unreadable date, and :class:`SelfageError` when the date is
    before the birth date or gives an age above 100.
    """
    birth = parse_birth_date(birth_date)
    assert birth is not None
    taken = exif_date(path)
    if taken is None:
        return None
    try:
        age = age_at(birth, taken)
    except ValueError:
        raise SelfageError(
            f"{path}: the EXIF date {taken.isoformat()} is before --birth-date {birth.isoformat()}; check the "
            "birth date or the camera's clock, or give this photo's age another way (--ages-file, NAME=AGE)."
        ) from None
    return check_age(age, f"{path} (EXIF date {taken.isoformat()}, --birth-date {birth.isoformat()})")

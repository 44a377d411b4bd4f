"""MovieLens ratings as click data, from any of the three shapes users bring.

GroupLens ML-1M release (``ratings.dat``, ``users.dat``, ``movies.dat``): ``::``-separated,
ISO-8859-1, no header::

    ratings.dat   UserID::MovieID::Rating::Timestamp
    users.dat     UserID::Gender::Age::Occupation::Zip-code
    movies.dat    MovieID::Title::Genres          (the title ends with the release year, "(YYYY)";
                                                   genres separated by '|')

GroupLens ML-100K release (``u.data``, ``u.user``, ``u.item``), no header::

    u.data   user id \t item id \t rating \t timestamp            (tab-separated)
    u.user   user id | age | gender | occupation | zip code         ('|'-separated, ISO-8859-1)
    u.item   movie id | title | release date (DD-Mon-YYYY) | video release date | IMDb URL |
             19 genre flags (0/1) in the order of ``ML100K_GENRES``  ('|'-separated, ISO-8859-1)

RecBole atomic files (one each of ``*.inter``, ``*.user``, ``*.item``): tab-separated, UTF-8, with a
typed header (``user_id:token``, ``rating:float`` ...); columns are found by name: ``user_id``,
``item_id``, ``rating`` in .inter; ``user_id``, ``age``, ``gender``, ``occupation``, ``zip_code`` in
.user; ``item_id``, ``release_year`` (and for genres ``genre``, or ``class`` in RecBole's ml-100k, a
space-separated ``token_seq``) in .item.

Each rating line becomes one row (the KD-DAGFM / FuxiCTR convention), in ratings-file order:
    label         1.0 if rating >= 4, 0.0 if rating <= 2; ratings in between (3, and 2.5 / 3.5 in
                  half-star releases) are dropped by rule, counted in ``dropped_by_rule`` as
                  ``rating_<value>`` (``rating_3``)
    user_id, item_id                     as written in the ratings file
    age, gender, occupation, zip_code    the user's, from the users file
    release_year  the item's: RecBole ``release_year``; ML-1M the title's trailing "(YYYY)"; ML-100K
                  the release date's year
    All 7 are string features; empty values (and titles without a year) are null (missing).
    genres        with ``MovieLensOptions(genres=True)``: the item's genres, a multi-hot feature
                  (list of genre names, e.g. ["Animation", "Children's", "Comedy"]; empty when none)
    Timestamps and the other columns are not used.

``row_id`` is the 0-based physical line of the rating in its file. The RecBole header is line 0, so
there the first rating has row_id 1; in every shape a rating's 1-based line number is row_id + 1.

Ratings lines are quarantined as ``wrong_column_count``, ``bad_user_id`` / ``bad_item_id`` (empty or
not a printable ASCII token), ``bad_rating`` (not a number in 0.5..5), ``unknown_user`` and
``unknown_item`` (absent from the users / items file), checked in that order and before the
labelling rule. The users and items files are small and loaded into memory; a malformed line there
is an error, not a quarantined row. The ratings file is streamed in blocks of ``block_bytes``.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Counter, Dict, Iterator, List, Literal, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from recsys_kd.data import fields
from recsys_kd.data.quarantine import Quarantine
from recsys_kd.data.rawtext import RawBlock, count_lines, one_line, read_delimited, section_blocks
from recsys_kd.data.sections import deal_files
from recsys_kd.data.source import LABEL, InputError, Section, SourceChunk, SourceInfo

USER_ID = "user_id"
ITEM_ID = "item_id"
RATING = "rating"
USER_FEATURES = ["age", "gender", "occupation", "zip_code"]
ITEM_FEATURES = ["release_year"]
FEATURES = [USER_ID, ITEM_ID, *USER_FEATURES, *ITEM_FEATURES]
GENRES = "genres"
POSITIVE_FROM = 4.0
NEGATIVE_UP_TO = 2.0
MIN_RATING, MAX_RATING = 0.5, 5.0
NUMBER = r"^[0-9]{1,3}(\.[0-9]{1,6})?$"
GROUPLENS_ENCODING = "iso-8859-1"
# A GroupLens ratings line split at every ':' yields empty fields between the '::' pairs; reading
# it that way keeps rawtext's single-byte splitting and exact line numbers.
GROUPLENS_RATING_FIELDS = [USER_ID, "gap1", ITEM_ID, "gap2", RATING, "gap3", "timestamp"]
GROUPLENS_GAPS = ["gap1", "gap2", "gap3"]
GROUPLENS_USERS = [USER_ID, "gender", "age", "occupation", "zip_code"]
GROUPLENS_MOVIES = [ITEM_ID, "title", GENRES]
TITLE_YEAR = r"\((?P<year>[0-9]{4})\)\s*$"
ML100K_RATING_FIELDS = [USER_ID, ITEM_ID, RATING, "timestamp"]
ML100K_USERS = [USER_ID, "age", "gender", "occupation", "zip_code"]
# u.genre of the ML-100K release, in the order of u.item's 19 flag columns
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]
ML100K_ITEMS = [ITEM_ID, "title", "release_date", "video_release_date", "url", *ML100K_GENRES]
DATE_YEAR = r"(?P<year>[0-9]{4})\s*$"
RECBOLE_GENRE_COLUMNS = ("genre", "class")


@dataclass
class MovieLensOptions:
    """``genres``: add the movie's genres as the multi-hot feature ``genres`` (off by default: the
    peers' 7-field protocol has none)."""

    genres: bool = False


@dataclass(frozen=True)
class MovieLensFiles:
    """The three files of one MovieLens release and which shape they have."""

    layout: Literal["grouplens", "grouplens-100k", "recbole"]
    ratings: Path
    users: Path
    items: Path


def locate(inputs: List[Path]) -> MovieLensFiles:
    """Finds the ratings, users and items files among ``inputs`` (directories and/or files)."""
    candidates: List[Path] = []
    for path in map(Path, inputs):
        candidates.extend(sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path])
    by_name = {path.name: path for path in candidates}
    where = ", ".join(str(p) for p in inputs)
    if "ratings.dat" in by_name:
        missing = [name for name in ("users.dat", "movies.dat") if name not in by_name]
        if missing:
            raise FileNotFoundError(f"movielens: ratings.dat found but not {' and '.join(missing)} in {where}")
        return MovieLensFiles("grouplens", by_name["ratings.dat"], by_name["users.dat"], by_name["movies.dat"])
    if "u.data" in by_name:
        missing = [name for name in ("u.user", "u.item") if name not in by_name]
        if missing:
            raise FileNotFoundError(f"movielens: u.data found but not {' and '.join(missing)} in {where}")
        return MovieLensFiles("grouplens-100k", by_name["u.data"], by_name["u.user"], by_name["u.item"])
    found = {suffix: [p for p in candidates if p.suffix == suffix] for suffix in (".inter", ".user", ".item")}
    if not found[".inter"]:
        raise FileNotFoundError(f"movielens: no ratings.dat or u.data (GroupLens) or *.inter (RecBole) file in {where}")
    problems = [f"{len(paths)} {suffix} files" for suffix, paths in found.items() if len(paths) != 1]
    if problems:
        raise InputError(
            f"movielens: RecBole input needs exactly one .inter, .user and .item file; "
            f"found {', '.join(problems)} in {where}"
        )
    return MovieLensFiles("recbole", found[".inter"][0], found[".user"][0], found[".item"][0])


def recbole_columns(path: Path) -> List[str]:
    """Column names of a RecBole atomic file, from its typed header (``user_id:token`` -> ``user_id``)."""
    with open(path, "rb") as handle:
        line = handle.readline()
    try:
        header = line.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise InputError(f"{path}: the header line is not UTF-8") from None
    return [column.split(":", 1)[0] for column in header.split("\t")]


def read_recbole_table(path: Path, required: List[str]) -> pa.Table:
    """The ``required`` columns of a small RecBole atomic file, as strings (empty = null)."""
    names = recbole_columns(path)
    missing = [name for name in required if name not in names]
    if missing:
        raise InputError(f"{path}: no column {', '.join(missing)} in the header (has: {', '.join(names)})")
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in names}, strings_can_be_null=False, include_columns=required
            ),
        )
    except (pa.ArrowInvalid, OSError) as error:
        raise InputError(f"{path}: {one_line(error)}") from error
    return pa.table({name: fields.to_token(table.column(name).combine_chunks()) for name in required})


def read_grouplens_table(path: Path, names: List[str], separator: str = "::") -> pa.Table:
    """A small GroupLens ISO-8859-1 file (``::``-separated, or ``|`` in ML-100K) as string columns
    (empty = null)."""
    rows = []
    # Split on '\n' only: str.splitlines would also split at '\x85', a latin-1 letter byte here.
    for number, line in enumerate(path.read_bytes().decode(GROUPLENS_ENCODING).split("\n"), start=1):
        line = line.rstrip("\r")
        if not line:
            continue
        parts = line.split(separator)
        if len(parts) != len(names):
            raise InputError(
                f"{path}:{number}: expected {len(names)} {separator!r}-separated fields "
                f"({separator.join(names)}), got {len(parts)}"
            )
        rows.append(parts)
    columns = list(zip(*rows)) if rows else [()] * len(names)
    return pa.table({name: fields.to_token(pa.array(column, pa.string())) for name, column in zip(names, columns)})


def _flagged_genres(movies: pa.Table, path: Path) -> pa.Array:
    """ML-100K's 19 genre flag columns -> each movie's list of genre names (in ``ML100K_GENRES`` order)."""
    flags = []
    for name in ML100K_GENRES:
        column = movies.column(name).combine_chunks()
        bad = fields.invalid_mask(column.cast(pa.binary()).fill_null(b""), r"^[01]$", allow_empty=False)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise InputError(f"{path}:{row + 1}: genre flag {name!r} must be 0 or 1, got {column[row].as_py()!r}")
        flags.append(np.asarray(column.to_numpy(zero_copy_only=False) == "1"))
    matrix = np.stack(flags, axis=1)  # [movies, 19]
    counts = matrix.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    names = np.array(ML100K_GENRES, dtype=object)[np.nonzero(matrix)[1]]
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(names, pa.string()))


def _keyed(table: pa.Table, key: str, path: Path) -> pa.Table:
    if table.column(key).null_count or pc.count_distinct(table.column(key)).as_py() != table.num_rows:
        raise InputError(f"{path}: {key} values must be present and unique")
    return table


class MovieLensSource:
    """Streams labelled MovieLens ratings joined with their user and item features.

    Example::

        source = MovieLensSource([Path("ml-1m")], MovieLensOptions(genres=True))  # or ml-100k, or RecBole's
        for chunk in source.chunks(quarantine):
            chunk.table   # row_id, label, user_id, item_id, age, gender, occupation, zip_code, release_year,
                          # genres (list<string>)
        source.dropped_by_rule   # {"rating_3": ...} after a full pass
    """

    def __init__(
        self, inputs: List[Path], options: Optional[MovieLensOptions] = None, block_bytes: int = 16 << 20
    ) -> None:
        self.files = locate(inputs)
        self.options = options or MovieLensOptions()
        self.block_bytes = block_bytes
        users, items = self._side_tables()
        self.users = _keyed(users, USER_ID, self.files.users)
        self.items = _keyed(items, ITEM_ID, self.files.items)
        # Ratings ids stay raw bytes (never decoded), so they are looked up as binary.
        self._user_keys = self.users.column(USER_ID).combine_chunks().cast(pa.binary())
        self._item_keys = self.items.column(ITEM_ID).combine_chunks().cast(pa.binary())
        self.item_features = [*ITEM_FEATURES, *([GENRES] if self.options.genres else [])]
        self.info = SourceInfo(
            name="movielens",
            dense=[],
            sparse=[*FEATURES, *self.item_features[len(ITEM_FEATURES):]],
            multi_hot=[GENRES] if self.options.genres else [],
            inputs=[str(self.files.ratings), str(self.files.users), str(self.files.items)],
        )
        self.dropped_by_rule: Dict[str, int] = {}

    def _side_tables(self) -> Tuple[pa.Table, pa.Table]:
        """The users (user_id + USER_FEATURES) and items (item_id, release_year, genres) tables."""
        files = self.files
        if files.layout == "recbole":
            users = read_recbole_table(files.users, [USER_ID, *USER_FEATURES])
            items = read_recbole_table(files.items, [ITEM_ID, *ITEM_FEATURES])
            if self.options.genres:
                names = recbole_columns(files.items)
                column = next((name for name in RECBOLE_GENRE_COLUMNS if name in names), None)
                if column is None:
                    raise InputError(f"{files.items}: genres asked for, but no genre or class column (has: {', '.join(names)})")
                text = read_recbole_table(files.items, [column]).column(column).combine_chunks()
                items = items.append_column(GENRES, fields.split_tokens(text, " "))
            return users, items
        if files.layout == "grouplens":
            users = read_grouplens_table(files.users, GROUPLENS_USERS)
            movies = read_grouplens_table(files.items, GROUPLENS_MOVIES)
            # A title without "(YYYY)" yields a null match, and so a null (missing) year.
            release_year = pc.struct_field(pc.extract_regex(movies.column("title"), TITLE_YEAR), [0])
            genres = fields.split_tokens(movies.column(GENRES).combine_chunks(), "|")
        else:
            users = read_grouplens_table(files.users, ML100K_USERS, "|")
            movies = read_grouplens_table(files.items, ML100K_ITEMS, "|")
            release_year = pc.struct_field(pc.extract_regex(movies.column("release_date"), DATE_YEAR), [0])
            genres = _flagged_genres(movies, files.items)
        items = pa.table({ITEM_ID: movies.column(ITEM_ID), "release_year": release_year})
        if self.options.genres:
            items = items.append_column(GENRES, genres)
        return users, items

    def progress_total(self) -> int:
        return os.path.getsize(self.files.ratings)

    def deal(self, world_size: int) -> List[List[Section]]:
        return deal_files([self.files.ratings], world_size)

    def count_lines(self, section: Section) -> int:
        return count_lines(self.files.ratings, section)

    def chunks(self, quarantine: Optional[Quarantine], sections: Optional[Sequence[Section]] = None) -> Iterator[SourceChunk]:
        if self.files.layout == "grouplens":
            names, delimiter, header = GROUPLENS_RATING_FIELDS, ":", False
        elif self.files.layout == "grouplens-100k":
            names, delimiter, header = ML100K_RATING_FIELDS, "\t", False
        else:
            names, delimiter, header = recbole_columns(self.files.ratings), "\t", True
            missing = [name for name in (USER_ID, ITEM_ID, RATING) if name not in names]
            if missing:
                raise InputError(f"{self.files.ratings}: no column {', '.join(missing)} in the header")
        dropped: Counter[str] = collections.Counter()

        def read(path: Path, section: Optional[Section]) -> Iterator[RawBlock]:
            return read_delimited(path, names, delimiter, quarantine, skip_header=header, block_bytes=self.block_bytes,
                                  section=section)

        for block, _ in section_blocks([self.files.ratings], sections, read):  # row_id: the line in the one file
            yield SourceChunk(self._convert(block, delimiter, quarantine, dropped), block.size)
        # Replaced, not added to, at the end of each pass: a second pass counts the same rows.
        self.dropped_by_rule = dict(sorted(dropped.items()))

    def _convert(
        self, block: RawBlock, delimiter: str, quarantine: Optional[Quarantine], dropped: Counter[str]
    ) -> pa.Table:
        """The block's valid, labelled rows joined with user and item features."""
        table = block.table
        users = table.column(USER_ID).combine_chunks()
        items = table.column(ITEM_ID).combine_chunks()
        rating_text = table.column(RATING).combine_chunks()
        is_number = ~fields.invalid_mask(rating_text, NUMBER, allow_empty=False)
        # Non-numbers become "0" (out of range) so the column casts at once; they are refused anyway.
        numeric_text = pc.if_else(pa.array(is_number, pa.bool_()), rating_text, pa.scalar(b"0", pa.binary()))
        ratings = np.asarray(numeric_text.cast(pa.string()).cast(pa.float64()).to_numpy(zero_copy_only=False))
        user_rows = pc.index_in(users, value_set=self._user_keys)
        item_rows = pc.index_in(items, value_set=self._item_keys)
        checks = []
        if self.files.layout == "grouplens":
            gaps = np.zeros(table.num_rows, dtype=bool)
            for name in GROUPLENS_GAPS:
                gaps |= pc.binary_length(table.column(name)).to_numpy() > 0
            checks.append(("wrong_column_count", gaps))
        checks += [
            ("bad_user_id", fields.invalid_mask(users, fields.TOKEN, allow_empty=False)),
            ("bad_item_id", fields.invalid_mask(items, fields.TOKEN, allow_empty=False)),
            ("bad_rating", (ratings < MIN_RATING) | (ratings > MAX_RATING)),
            ("unknown_user", user_rows.is_null().to_numpy(zero_copy_only=False)),
            ("unknown_item", item_rows.is_null().to_numpy(zero_copy_only=False)),
        ]
        bad, reasons = fields.first_reason(checks, table.num_rows)
        fields.quarantine_rows(quarantine, block.file, table, block.lines, bad, reasons, delimiter)
        neutral = ~bad & (ratings > NEGATIVE_UP_TO) & (ratings < POSITIVE_FROM)
        if neutral.any():
            values, counts = np.unique(ratings[neutral], return_counts=True)
            for value, count in zip(values, counts):
                dropped[f"rating_{value:g}"] += int(count)
        keep_rows = ~bad & ~neutral
        keep = pa.array(keep_rows, pa.bool_())
        columns = {
            "row_id": pa.array(block.lines[keep_rows], pa.int64()),
            LABEL: pa.array(ratings[keep_rows] >= POSITIVE_FROM).cast(pa.float32()),
            USER_ID: users.filter(keep).cast(pa.string()),
            ITEM_ID: items.filter(keep).cast(pa.string()),
        }
        user_rows, item_rows = user_rows.filter(keep), item_rows.filter(keep)
        for name in USER_FEATURES:
            columns[name] = self.users.column(name).take(user_rows)
        for name in self.item_features:
            columns[name] = self.items.column(name).take(item_rows)
        return pa.table(columns)

"""The dataset contract: ``schema.json`` beside the Parquet parts of each split.

Layout of a prepared dataset directory::

    schema.json             this schema (features, id rules, splits with their parts, row counts and
                            each part's checksum)
    train/part-00000.parquet, ...   one directory per split; row groups of bounded size
    valid/..., test/...
    vocab/<feature>.parquet vocabularies (value, id, count) for features with a vocabulary id rule
    quarantine.jsonl        rows the converter refused: file, line, reason, text
    prepare.json            the record of the run that made it

Columns of every part: ``row_id`` (int64, the source row's 0-based index in its input, unique in the
dataset), the label (float32), dense features (float32), sparse features (int64, or list<int64> when
``multi_hot``), for each ``weighted`` sparse feature its values ``<feature>__weight`` (float32, or
list<float32> as long as each row's id list: the value of each id, which multiplies its embedding),
and any ``extra`` float32 columns (e.g. teacher logits).

Ids 0 and 1 are reserved in every sparse feature: 0 = value missing, 1 = value out of vocabulary
(rare in training, or unseen when scoring raw logs). Hashing maps values into [2, num_embeddings).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Literal, Optional, Sequence

from recsys_kd.config import from_dict, to_dict
from recsys_kd.io import atomic_write_text
from recsys_kd.runs import SCHEMA_FILE

FORMAT_VERSION = 1
MISSING_ID = 0
OOV_ID = 1
RESERVED_IDS = 2
ROW_ID = "row_id"
WEIGHT_SUFFIX = "__weight"


class SchemaError(ValueError):
    """A dataset does not satisfy its schema (or a model's); the message names file and key."""


@dataclass(frozen=True)
class IdRule:
    """How raw values became ids: a vocabulary with a minimum count, a hash into buckets, or ids
    that were produced in range already (synthetic data)."""

    kind: Literal["vocab", "hash", "identity"]
    min_count: int = 1
    seed: int = 0
    vocab_file: Optional[str] = None


def weight_column(feature: str) -> str:
    """The column holding the values of weighted sparse feature ``feature``'s ids."""
    return f"{feature}{WEIGHT_SUFFIX}"


@dataclass(frozen=True)
class SparseFeature:
    """A sparse feature: its table size, how raw values became ids, whether a row holds a list of ids
    (``multi_hot``) and whether each id carries a float32 value (``weighted``, column
    :func:`weight_column`), by which its embedding is multiplied before sum pooling."""

    name: str
    num_embeddings: int
    id_rule: IdRule
    multi_hot: bool = False
    source: str = ""
    weighted: bool = False


@dataclass(frozen=True)
class SplitInfo:
    """A split's parts (paths relative to the dataset), row and positive counts, and each part's
    checksum when it was written (``{relative file: "crc32:<hex>"}``, :mod:`recsys_kd.data.integrity`);
    empty in datasets prepared before checksums were recorded, which cannot be verified."""

    files: List[str]
    rows: int
    positives: int = 0
    checksums: Dict[str, str] = field(default_factory=dict)


@dataclass
class Schema:
    """A dataset's schema. ``splits`` maps split name -> parts (relative paths) and counts."""

    name: str
    label: str
    dense: List[str]
    sparse: List[SparseFeature]
    extra: List[str] = field(default_factory=list)
    dense_transform: str = "none"
    splits: Dict[str, SplitInfo] = field(default_factory=dict)
    source: Dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def sparse_names(self) -> List[str]:
        return [feature.name for feature in self.sparse]

    @property
    def weighted(self) -> bool:
        """Whether any sparse feature carries values: then every batch's KeyedJaggedTensor has weights
        (ones for the unweighted features) and the embedding tables pool ``sum(value * row)``."""
        return any(feature.weighted for feature in self.sparse)

    @property
    def weight_columns(self) -> List[str]:
        return [weight_column(feature.name) for feature in self.sparse if feature.weighted]

    @property
    def num_embeddings(self) -> Dict[str, int]:
        return {feature.name: feature.num_embeddings for feature in self.sparse}

    def feature(self, name: str) -> SparseFeature:
        for feature in self.sparse:
            if feature.name == name:
                return feature
        raise SchemaError(f"schema {self.name!r} has no sparse feature {name!r}")

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise SchemaError(f"schema {self.name!r} has no split {name!r} (has: {sorted(self.splits)})")
        return self.splits[name]

    def feature_change(self, features: Sequence[str]) -> Optional[str]:
        """How ``features`` (names, in any order) differ from this schema's dense and sparse features:
        the first one missing there, or else the first one this schema lacks; None when they match."""
        ours = [*self.dense, *self.sparse_names]
        missing = [name for name in ours if name not in features]
        extra = [name for name in features if name not in ours]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            return f"no feature {missing[0]!r}{more}, which the model was trained with"
        if extra:
            more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
            return f"feature {extra[0]!r}{more}, which the model was not trained with"
        return None

    def columns(self) -> List[str]:
        return [ROW_ID, self.label, *self.dense, *self.sparse_names, *self.weight_columns, *self.extra]

    def replace(self, **changes) -> "Schema":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2, sort_keys=False) + "\n"

    def save(self, directory: Path) -> None:
        atomic_write_text(Path(directory) / SCHEMA_FILE, self.to_json())

    @classmethod
    def load(cls, directory: Path) -> "Schema":
        path = Path(directory) / SCHEMA_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as error:
            raise SchemaError(f"{path}: not found; is {directory} a prepared dataset?") from error
        except json.JSONDecodeError as error:
            raise SchemaError(f"{path}: corrupt schema ({error})") from error
        schema = from_dict(cls, data, source=str(path))
        if schema.format_version != FORMAT_VERSION:
            raise SchemaError(f"{path}: format_version {schema.format_version}, this build reads {FORMAT_VERSION}")
        return schema

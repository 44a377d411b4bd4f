"""Raw values -> embedding ids by a schema's id rules: the one applier.

``prepare`` turns a converter's rows into the dataset's ids with :class:`IdRules`, and ``score`` turns
raw logs into the model's inputs with the same class built from the artifact's schema, so a row gets
the same ids at training and at serving time. The rules (:class:`~recsys_kd.data.schema.IdRule`):

- ``hash``: ``hash_ids(value, num_embeddings, rule.seed)``, ids in [2, num_embeddings); ``rule.seed`` is
  the configured seed plus the feature's salt (:func:`feature_salt`), so two features hash the same
  value to unrelated ids.
- ``vocab``: row r of the feature's vocabulary gets id r + 2; a value not in it gets ``OOV_ID`` (1).
- ``identity``: the values are ids already (generated data).

Whatever the rule, a missing value gets ``MISSING_ID`` (0). A multi-hot feature (a list column) maps
each value of each list. Vocabularies are the ``value`` column of ``vocab/<feature>.parquet`` in a
prepared dataset, or given in memory while ``prepare`` builds them.

Example::

    rules = IdRules.load(Schema.load("runs/demo/data"), "runs/demo/data")
    ids_table = rules.apply(chunk.table)   # row_id, label, dense, sparse ids, extra
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys_kd.data import fields
from recsys_kd.data.ids import hash_ids, vocab_ids
from recsys_kd.data.schema import RESERVED_IDS, ROW_ID, Schema, SchemaError, SparseFeature, weight_column
from recsys_kd.data.source import LABEL


def feature_salt(name: str) -> int:
    """Added to the hash seed of feature ``name``: different features hash the same raw value to
    unrelated ids. Stable across processes and machines."""
    return int.from_bytes(name.encode("utf-8")[:8].ljust(8, b"\0"), "little") & 0x7FFFFFFF


def vocab_file(name: str) -> str:
    """Where a prepared dataset keeps feature ``name``'s vocabulary, relative to the dataset."""
    return f"vocab/{name}.parquet"


def vocab_features(schema: Schema) -> List[str]:
    """The sparse features whose ids come from a vocabulary."""
    return [feature.name for feature in schema.sparse if feature.id_rule.kind == "vocab"]


class IdRules:
    """A schema's id rules, ready to apply to a converter's tables.

    Args:
        schema: the features (names, ``num_embeddings``, id rules), label, dense and extra columns.
        vocabularies: feature -> its vocabulary values (row r has id r + 2), for every ``vocab`` feature.

    Raises:
        SchemaError: a ``vocab`` feature without a vocabulary.
    """

    def __init__(self, schema: Schema, vocabularies: Optional[Mapping[str, pa.Array]] = None) -> None:
        self.schema = schema
        self.vocabularies: Dict[str, pa.Array] = dict(vocabularies or {})
        missing = [name for name in vocab_features(schema) if name not in self.vocabularies]
        if missing:
            raise SchemaError(f"schema {schema.name!r}: features {missing} have vocabulary ids and no vocabulary was given")

    @classmethod
    def load(cls, schema: Schema, dataset: Optional[Union[str, Path]]) -> "IdRules":
        """The rules with the vocabularies of the prepared ``dataset`` (needed only when ``schema`` has
        ``vocab`` features). Raises SchemaError when a vocabulary file is missing or does not have
        ``num_embeddings - 2`` values (a vocabulary of another dataset)."""
        vocabularies = {}
        for name in vocab_features(schema):
            if dataset is None:
                raise SchemaError(f"feature {name!r} has vocabulary ids: the prepared dataset holding its vocabulary is needed")
            feature = schema.feature(name)
            path = Path(dataset) / (feature.id_rule.vocab_file or vocab_file(name))
            if not path.exists():
                raise SchemaError(f"{path}: vocabulary of feature {name!r} not found")
            vocabulary = pq.read_table(path, columns=["value"]).column("value").combine_chunks()
            expected = feature.num_embeddings - RESERVED_IDS
            if len(vocabulary) != expected:
                raise SchemaError(
                    f"{path}: {len(vocabulary)} values, but the table for {name!r} has {expected} vocabulary rows "
                    f"(num_embeddings {feature.num_embeddings} minus {RESERVED_IDS} reserved ids); is it the "
                    "vocabulary of the same dataset?"
                )
            vocabularies[name] = vocabulary
        return cls(schema, vocabularies)

    def apply(self, table: pa.Table) -> pa.Table:
        """A converter's table (``row_id``, ``label``, dense, raw sparse values, extra columns) -> the
        prepared columns: ``row_id``, the label (float32), dense (float32), sparse ids (int64, or
        list<int64> when multi-hot), weighted features' values (float32, or list<float32> aligned with
        the ids), extra (float32). Sparse features are converted in parallel threads."""
        schema = self.schema
        columns = {ROW_ID: table.column(ROW_ID), schema.label: table.column(LABEL).cast(pa.float32())}
        for name in schema.dense:
            columns[name] = table.column(name).cast(pa.float32())
        converted = fields.thread_pool().map(lambda feature: self.ids(table.column(feature.name), feature), schema.sparse)
        columns.update(zip(schema.sparse_names, converted))
        for feature in schema.sparse:
            if feature.weighted:
                columns[weight_column(feature.name)] = _weights(table.column(weight_column(feature.name)))
        for name in schema.extra:
            columns[name] = table.column(name).cast(pa.float32())
        return pa.table(columns)

    def ids(self, values: Union[pa.Array, pa.ChunkedArray], feature: SparseFeature) -> pa.Array:
        """One feature's raw values (a list column when multi-hot) -> its ids."""
        values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        rule = feature.id_rule
        if rule.kind == "identity":
            return values.cast(pa.int64())
        multi_hot = pa.types.is_list(values.type) or pa.types.is_large_list(values.type)
        flat = pc.list_flatten(values) if multi_hot else values
        if rule.kind == "vocab":
            ids = vocab_ids(flat, self.vocabularies[feature.name])
        else:
            ids = hash_ids(flat, feature.num_embeddings, rule.seed)
        if multi_hot:
            offsets = pa.array(fields.list_offsets(values).astype(np.int32))  # a slice's too, nulls empty
            return pa.ListArray.from_arrays(offsets, pa.array(ids, pa.int64()))
        return pa.array(ids, pa.int64())


def _weights(values: Union[pa.Array, pa.ChunkedArray]) -> pa.Array:
    """A weighted feature's values as float32, or list<float32> with the offsets its ids get in
    :meth:`IdRules.ids` (a slice's too), so the two lists stay aligned."""
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        offsets = pa.array(fields.list_offsets(values).astype(np.int32))
        return pa.ListArray.from_arrays(offsets, pc.list_flatten(values).cast(pa.float32()))
    return values.cast(pa.float32())

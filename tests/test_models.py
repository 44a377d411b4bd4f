"""Models: the embedding front end's field order and values, every model's contract (shapes, hidden
vector, parameter split, scripted head, trainability), hand-counted FLOPs, and identical logits when the
tables are sharded by DistributedModelParallel (which returns the pooled embeddings in another order)."""

import copy
import warnings
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, data_parallel, table_wise
from torchrec.distributed.types import ShardingPlan
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_kd.config import ConfigError, from_dict
from recsys_kd.data.batch import Batch
from recsys_kd.data.schema import SchemaError
from recsys_kd.models import MODEL_NAMES, CTRModel, FieldEmbedding, ModelConfig, build_model
from recsys_kd.models.low_rank import CompressedMLP, LowRankFieldEmbedding, LowRankStep
from tests.helpers import tiny_batch, tiny_schema

B = 8

pytestmark = pytest.mark.usefixtures("one_thread", "seeded")
SCHEMA = tiny_schema(with_hour=True)
NUM_FIELDS = 6  # 2 projected dense + 4 sparse
D = 4
SMALL: Dict[str, Any] = dict(
    embedding_dim=D,
    mlp_layers=[16, 8],
    tiny_mlp_layers=[8],
    cross_layers=2,
    low_rank=3,
    num_experts=2,
    cin_layers=[6, 4],
    attention_layers=2,
    attention_dim=4,
    dagfm_layers=2,
)
# every model, plus the variants that build other layers
CASES: List[Tuple[str, Dict[str, Any]]] = [(name, {}) for name in MODEL_NAMES] + [
    ("dcnv2", {"cross_type": "low_rank"}),
    ("dcnv2", {"cross_type": "mixture", "dcn_structure": "stacked"}),
    ("xdeepfm", {"cin_split_half": True}),
    ("dagfm_plus", {"dagfm_type": "inner"}),
    ("deepfm", {"dense_mode": "none", "batch_norm": True, "dropout": 0.1}),
]
CASE_IDS = [name + "".join(f"-{v}" for v in overrides.values()) for name, overrides in CASES]


def make_batch(seed: int = 0, batch_size: int = B) -> Batch:
    """A reader-shaped Batch: KJT keys in schema order, a multi-hot feature with an empty bag."""
    return tiny_batch(SCHEMA, seed, batch_size)


def build(name: str, **overrides: Any) -> CTRModel:
    return build_model(SCHEMA, ModelConfig(name=name, **{**SMALL, **overrides}))


# ---------------------------------------------------------------- the embedding front end


def test_field_embedding_values_in_schema_order() -> None:
    embedding = FieldEmbedding(SCHEMA, embedding_dim=D)
    with torch.no_grad():
        for table in embedding.ebc.embedding_bags.values():
            table.weight.normal_()  # the 1e-4 initialisation would make any comparison pass
    batch = make_batch()
    fields = embedding(batch.dense, batch.sparse)
    assert fields.shape == (B, NUM_FIELDS, D)
    assert embedding.field_names == ["d0", "d1", "user", "tags", "item", "hour"]

    expected = [batch.dense[:, j : j + 1] * embedding.dense_weight[j] for j in range(2)]
    jagged = batch.sparse.to_dict()
    for feature in SCHEMA.sparse_names:
        table = embedding.ebc.embedding_bags[f"t_{feature}"].weight
        bags = jagged[feature].to_dense()  # list of B id tensors
        expected.append(torch.stack([table[ids].sum(dim=0) for ids in bags]))
    torch.testing.assert_close(fields, torch.stack(expected, dim=1))

    # KJT key order does not matter: features are looked up by name
    permuted = KeyedJaggedTensor.from_jt_dict({k: jagged[k] for k in reversed(SCHEMA.sparse_names)})
    torch.testing.assert_close(embedding(batch.dense, permuted), fields)


def test_field_embedding_init_and_dense_modes() -> None:
    embedding = FieldEmbedding(SCHEMA, embedding_dim=16)
    table = embedding.ebc.embedding_bags["t_user"].weight
    assert table.abs().max() < 1e-3 and table.std() > 0  # normal, std 1e-4 (FuxiCTR)

    ignored = FieldEmbedding(SCHEMA, embedding_dim=D, dense_mode="none")
    batch = make_batch()
    assert ignored.field_names == SCHEMA.sparse_names and ignored.dense_weight is None
    assert ignored(torch.empty(B, 0), batch.sparse).shape == (B, 4, D)
    with pytest.raises(SchemaError, match=r"expects \[B, 2\]"):
        FieldEmbedding(SCHEMA, embedding_dim=D)(batch.dense[:, :1], batch.sparse)
    with pytest.raises(ValueError, match="dense_mode"):
        FieldEmbedding(SCHEMA, embedding_dim=D, dense_mode="bucketized")


# ---------------------------------------------------------------- every model


@pytest.mark.parametrize("name,overrides", CASES, ids=CASE_IDS)
def test_model_contract(name: str, overrides: Dict[str, Any]) -> None:
    model = build(name, **overrides).eval()
    batch = make_batch()
    logits, hidden, fields = model.forward_with_hidden(batch.dense, batch.sparse)
    num_fields = NUM_FIELDS if overrides.get("dense_mode") != "none" else NUM_FIELDS - 2
    assert logits.shape == (B,) and torch.isfinite(logits).all()
    assert hidden.shape == (B, model.hidden_dim)
    assert fields.shape == (B, num_fields, 1 if name == "lr" else D)
    torch.testing.assert_close(model(batch.dense, batch.sparse), logits)

    counts = model.num_parameters()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] == counts["embedding"] + counts["dense"]
    tables = sum(f.num_embeddings for f in SCHEMA.sparse)
    dims = (0 if name == "lr" else D) + (1 if name == "lr" or model.first_order is not None else 0)
    assert counts["embedding"] == tables * dims
    # "dense" is the head plus the dense projections and the first-order bias
    non_tables = [p for n, p in model.named_parameters() if ".embedding_bags." not in n]
    assert counts["dense"] == sum(p.numel() for p in non_tables)

    # the head alone scripts (serving) and computes the same function
    first_order = model.first_order(batch.dense, batch.sparse) if model.first_order is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit itself is deprecated in 2.13
        scripted = torch.jit.script(model.head)
    torch.testing.assert_close(scripted(fields, first_order), logits)
    torch.testing.assert_close(scripted.forward_with_hidden(fields, first_order)[1], hidden)


@pytest.mark.parametrize("name,overrides", CASES, ids=CASE_IDS)
def test_model_fits_a_tiny_batch(name: str, overrides: Dict[str, Any]) -> None:
    model = build(name, **overrides)
    batch = make_batch(seed=1, batch_size=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(30):
        logits = model(batch.dense, batch.sparse)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_xavier_normal_linear_init() -> None:
    """``linear_init: xavier_normal`` (FuxiCTR's default) draws every Linear of the head from
    N(0, 2 / (fan_in + fan_out)) with zero biases; the default keeps PyTorch's uniform init and the
    tables are the same either way."""
    schema = tiny_schema()
    torch.manual_seed(0)
    default = build_model(schema, ModelConfig(name="dnn", embedding_dim=8, mlp_layers=[512, 512]))
    torch.manual_seed(0)
    xavier = build_model(schema, ModelConfig(name="dnn", embedding_dim=8, mlp_layers=[512, 512],
                                             linear_init="xavier_normal"))
    linears = [m for m in xavier.head.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    for layer in linears:
        fan_out, fan_in = layer.weight.shape
        assert layer.weight.std().item() == pytest.approx((2.0 / (fan_in + fan_out)) ** 0.5, rel=0.05)
        assert not layer.bias.any()
    wide = [m for m in default.head.modules() if isinstance(m, nn.Linear)][1]  # 512 -> 512
    assert wide.weight.abs().max().item() <= 512 ** -0.5  # uniform with bound 1/sqrt(fan_in)
    assert wide.bias.any()
    for key, table in default.embedding.state_dict().items():
        torch.testing.assert_close(xavier.embedding.state_dict()[key], table)
    with pytest.raises(ConfigError, match="linear_init"):
        from_dict(ModelConfig, {"linear_init": "he"})


def test_unknown_names_and_bad_hyperparameters() -> None:
    with pytest.raises(ValueError, match="known models: lr, fm, dnn"):
        build_model(SCHEMA, ModelConfig(name="dcn_v3"))
    with pytest.raises(ConfigError, match="dagfm_type"):
        from_dict(ModelConfig, {"name": "dagfm_inner", "dagfm_type": "outer"}, source="m.yaml")
    with pytest.raises(ConfigError, match="mlp_layers"):
        from_dict(ModelConfig, {"name": "dnn", "mlp_layers": []}, source="m.yaml")
    with pytest.raises(ConfigError, match="cross_type"):
        from_dict(ModelConfig, {"name": "dcnv2", "cross_type": "diagonal"}, source="m.yaml")


def test_flops_hand_counts() -> None:
    # F = 6 (2 dense + 4 sparse), D = 4, N = 24. The dense projection is n_dense * D multiplies.
    # lr: D = 1, dense projection 2; sum of 6 fields 6 + bias 1
    assert build("lr").flops_per_example() == 2 + 7
    # dnn, MLP 24 -> 16 -> 8 -> 1: 2*24*16 + 16 + ReLU 16; 2*16*8 + 8 + ReLU 8; output 2*8 + 1
    mlp = (768 + 32) + (256 + 16)
    assert build("dnn").flops_per_example() == 8 + mlp + 17
    # dcn, 2 cross layers of 2N (dot) + 3N (scale x0, bias, residual); output Linear(24 + 8, 1)
    assert build("dcn").flops_per_example() == 8 + 2 * (48 + 72) + mlp + (2 * 32 + 1)


@pytest.mark.parametrize("name", ["dnn", "deepfm"])
def test_recorded_compression_builds_the_low_rank_structure(name: str) -> None:
    """build_model gives a config's LowRankSteps their modules: Linear 1 (16 -> 8) factored through
    rank 3, tables user and item V x 2 and V x 3, their up-projections folded into the first Linear
    (dnn, whose MLP reads the fields directly) or kept per field (deepfm, whose FM reads them)."""
    fused = name == "dnn"
    steps = [
        LowRankStep("mlp", {"1": 3}, relu_between=True),
        LowRankStep("embeddings", {"user": 2, "item": 3}, fused=fused),
    ]
    model = build(name, compression=steps).eval()
    mlp = model.head.mlp
    assert isinstance(mlp, CompressedMLP) and model.compression_steps == steps
    assert [(m.in_features, m.out_features) for m in mlp.layers if isinstance(m, nn.Linear)][1:] == [(16, 3), (3, 8)]
    assert isinstance(mlp.layers[3], nn.ReLU)
    embedding = model.embedding
    assert isinstance(embedding, LowRankFieldEmbedding) and embedding.fused == fused
    assert {n: t.weight.shape[1] for n, t in embedding.ebc.embedding_bags.items()} == {
        "t_user": 2, "t_tags": D, "t_item": 3, "t_hour": D
    }
    assert embedding.output_width == (2 * D + 2 + D + 3 + D if fused else NUM_FIELDS * D)
    assert mlp.layers[0].in_features == embedding.output_width
    batch = make_batch()
    logits, _, fields = model.forward_with_hidden(batch.dense, batch.sparse)
    assert logits.shape == (B,)
    assert fields.shape == ((B, embedding.output_width) if fused else (B, NUM_FIELDS, D))


# ---------------------------------------------------------------- sharded tables


def test_sharded_model_gives_the_same_logits(tmp_path: Path) -> None:
    # Stages run in-process by other tests leave a one-process default group behind: reuse it.
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    assert dist.get_world_size() == 1
    try:
        model = build("deepfm")  # field embeddings and first-order tables: two EBCs
        reference = copy.deepcopy(model).eval()
        state = copy.deepcopy(model.state_dict())
        # data-parallel and table-wise tables are grouped apart, so the sharded EBC's KeyedTensor keys
        # come back in another order than the schema's
        mixed = {
            f"t_{name}": data_parallel() if i % 2 else table_wise(rank=0, compute_kernel="fused")
            for i, name in enumerate(SCHEMA.sparse_names)
        }
        plan = ShardingPlan(
            {
                "embedding.ebc": construct_module_sharding_plan(
                    model.embedding.ebc, mixed, local_size=1, world_size=1, device_type="cpu"
                ),
                # D = 1 tables cannot take the fused kernel (FBGEMM needs columns divisible by 4)
                "first_order.weights.ebc": construct_module_sharding_plan(
                    model.first_order.weights.ebc,
                    {f"w_{name}": table_wise(rank=0, compute_kernel="dense") for name in SCHEMA.sparse_names},
                    local_size=1,
                    world_size=1,
                    device_type="cpu",
                ),
            }
        )
        dmp = DistributedModelParallel(model, device=torch.device("cpu"), plan=plan)
        dmp.load_state_dict(state)  # DMP re-initialised the sharded tables
        dmp.eval()

        batch = make_batch(seed=2)
        keys = dmp.module.embedding.ebc(batch.sparse).wait().keys()
        assert sorted(keys) == sorted(SCHEMA.sparse_names) and keys != SCHEMA.sparse_names
        expected, expected_hidden, expected_fields = reference.forward_with_hidden(batch.dense, batch.sparse)
        torch.testing.assert_close(dmp(batch.dense, batch.sparse), expected, atol=0.0, rtol=0.0)
        logits, hidden, fields = dmp.module.forward_with_hidden(batch.dense, batch.sparse)
        torch.testing.assert_close(fields, expected_fields, atol=0.0, rtol=0.0)
        torch.testing.assert_close(hidden, expected_hidden, atol=0.0, rtol=0.0)
    finally:
        if owned:
            dist.destroy_process_group()

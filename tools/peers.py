"""Peer figures: what other open systems measured on a split this project reproduces, for the tools
that print our figures beside them (``--peers <name>``).

``movielens-100k``: FuxiCTR 2.3.10 and RecBole 1.2.1 on MovieLens-100K, RecBole atomic files, rating 3
dropped, ``numpy.random.RandomState(2022).permutation`` split 80/10/10 (``configs/movielens.yaml``
reproduces it), D = 16, batch 1024, Adam lr 1e-3, early stop on valid AUC; test AUC at the best
valid epoch, measured 2026-11-22 (docs/train.md, "Peer figures"). Keys are this project's model
names, and for a distilled student its role and model (``student FT dagfm_outer``).
"""

from typing import Dict, Optional

PEERS: Dict[str, Dict[str, str]] = {
    "movielens-100k": {
        "lr": "0.8416 (FuxiCTR)",
        "fm": "0.8503 (FuxiCTR, 3 seeds)",
        "dnn": "0.8544 (FuxiCTR, 3 seeds)",
        "dcn": "0.8539 (FuxiCTR, 3 seeds)",
        "dcnv2": "0.8541 (FuxiCTR)",
        "xdeepfm": "0.8562 (FuxiCTR)",
        "crossnet": "0.8559 (RecBole KD_DAGFM teacher)",
        "student distilled dagfm_outer": "0.8550 (RecBole KD_DAGFM)",
        "student FT dagfm_outer": "0.8538 lr 1e-3 / 0.8556 lr 3e-3 (RecBole KD_DAGFM_FT)",
    },
}


def peer(peers: Optional[str], key: str) -> str:
    """The peer figure for ``key`` on split ``peers`` ('' when none was measured)."""
    if peers is None:
        return ""
    if peers not in PEERS:
        raise SystemExit(f"--peers {peers!r}: known peer splits: {', '.join(PEERS)}")
    return PEERS[peers].get(key, "")

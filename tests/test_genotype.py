import json

import pytest
import torch

from fastnas import Genotype, genotypes
from fastnas.errors import ConfigError
from fastnas.genotype import derive, derive_cell
from fastnas.space import SPACES

PRIMS = SPACES["at-darts"]


def _weights(rows):
    """[edges, ops] weights from {edge: {op: value}} with a small background."""
    w = torch.full((14, len(PRIMS)), 0.01)
    for e, ops in rows.items():
        for op, v in ops.items():
            w[e, PRIMS.index(op)] = v
    return w


def test_derivation_follows_darts_rule_on_handmade_alphas():
    # node 0: edges 0, 1; node 1: edges 2, 3, 4; node 2: edges 5..8; node 3: edges 9..13
    w = _weights({
        0: {"none": 0.9, "sep_conv_3x3": 0.2},          # 'none' is ignored when ranking
        1: {"channel_attention": 0.5},
        2: {"skip_connect": 0.3}, 3: {"dil_conv_5x5": 0.4}, 4: {"max_pool_3x3": 0.35},
        5: {"spatial_attention": 0.6}, 6: {"avg_pool_3x3": 0.1}, 7: {"sep_conv_5x5": 0.05}, 8: {"dil_conv_3x3": 0.7},
        9: {"none": 0.99}, 10: {"channel_attention": 0.3, "sep_conv_3x3": 0.3}, 11: {"skip_connect": 0.2},
        12: {"dil_conv_3x3": 0.1}, 13: {"max_pool_3x3": 0.25},
    })
    gene = derive_cell(w, PRIMS, 4)
    assert gene == [
        ("channel_attention", 1), ("sep_conv_3x3", 0),
        ("dil_conv_5x5", 1), ("max_pool_3x3", 2),
        ("dil_conv_3x3", 3), ("spatial_attention", 0),
        ("sep_conv_3x3", 1), ("max_pool_3x3", 4),  # tie between two ops on edge 10: the first op wins
    ]
    g = derive(w, w, PRIMS, 4, 4)
    assert g.normal_concat == [2, 3, 4, 5] and g.reduce == g.normal


def test_edge_weights_change_the_ranking():
    w = _weights({0: {"sep_conv_3x3": 0.5}, 1: {"sep_conv_5x5": 0.4}, 2: {"skip_connect": 0.3}})
    beta = torch.ones(14)
    beta[0] = 0.1
    gene = derive_cell(w, PRIMS, 4, edge_weights=beta)
    assert gene[:2] == [("sep_conv_5x5", 1), ("sep_conv_3x3", 0)]


def test_json_round_trip(tmp_path):
    g = genotypes.DARTS_V2
    path = tmp_path / "g.json"
    g.to_json(path)
    assert Genotype.from_json(path) == g
    assert Genotype.from_json(g.to_json()) == g
    assert json.loads(path.read_text())["normal"][0] == ["sep_conv_3x3", 0]


def test_string_round_trip_and_darts_strings():
    g = genotypes.DARTS_V1
    assert Genotype.parse(str(g)) == g
    darts_printed = ("Genotype(normal=[('sep_conv_3x3', 0), ('channel_attention', 1), ('sep_conv_3x3', 0), "
                     "('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), "
                     "('dil_conv_3x3', 2)], normal_concat=range(2, 6), reduce=[('max_pool_3x3', 0), "
                     "('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), "
                     "('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=range(2, 6))")
    p = Genotype.parse(darts_printed)
    assert p.normal[1] == ("channel_attention", 1) and p.normal_concat == [2, 3, 4, 5]


@pytest.mark.parametrize("text,match", [
    ("Genotype(normal=__import__('os').system('true'))", "only literals"),
    ("genotype = 3", "parse|expected"),
    ("Genotype(normal=[('sep_conv_3x3', 5), ('sep_conv_3x3', 0)], normal_concat=[2], "
     "reduce=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], reduce_concat=[2])", "does not exist"),
    ("Genotype(normal=[('sep_conv_3x3', 0)], normal_concat=[2], reduce=[], reduce_concat=[2])", "two edges"),
    ("{not json", "malformed"),
])
def test_bad_genotype_strings(text, match):
    with pytest.raises(ConfigError, match=match):
        Genotype.parse(text)


def test_validate_ops_and_steps():
    with pytest.raises(ConfigError, match="unknown op 'sep_conv_3x3'"):
        genotypes.DARTS_V2.validate(known_ops=["skip_connect"])
    with pytest.raises(ConfigError, match="expects 5"):
        genotypes.DARTS_V2.validate(steps=5)
    with pytest.raises(ConfigError, match="unknown genotype name"):
        genotypes.get("DARTS_V9")


def test_supernet_genotype_uses_the_alphas():
    import fastnas

    net = fastnas.SuperNet(4, 3, 10, in_channels=1)
    with torch.no_grad():
        net.alphas_normal.zero_()
        net.alphas_normal[:, PRIMS.index("channel_attention")] = 5.0
        net.alphas_normal[1, PRIMS.index("channel_attention")] = 6.0
    g = net.genotype()
    assert all(op == "channel_attention" for op, _ in g.normal)
    assert g.normal[0] == ("channel_attention", 1)

"""Each stage-1 attention mask, element by element, against its definition in BLIP-2 (section 3.2).

Positions 0..Q-1 are the queries, Q..Q+T-1 the text; entry [b, i, j] = True means position i
may attend to position j. The expected values are written as plain Python rules, one position
pair at a time, so they do not share code with the vectorised masks under test.
"""

import pytest
import torch

from instructblip_core.masks import bidirectional_mask, multimodal_causal_mask, unimodal_mask

N_QUERY = 3
# Right padding of different lengths, plus a full row; every text keeps at least its [CLS].
TEXT_MASK = torch.tensor(
    [
        [1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0],
        [1, 0, 0, 0, 0],
    ]
)


def is_text(i: int) -> bool:
    return i >= N_QUERY


def real_key(b: int, j: int) -> bool:
    """Queries are always real; a text key is real unless it is padding."""
    return not is_text(j) or bool(TEXT_MASK[b, j - N_QUERY])


def unimodal_rule(b: int, i: int, j: int) -> bool:
    # ITC: queries only with queries, text only with (non-padding) text.
    return is_text(i) == is_text(j) and real_key(b, j)


def bidirectional_rule(b: int, i: int, j: int) -> bool:
    # ITM: everything with everything except padding.
    return real_key(b, j)


def multimodal_causal_rule(b: int, i: int, j: int) -> bool:
    # ITG: a query sees the queries only; text token t sees every query and text tokens <= t.
    if not is_text(i):
        return not is_text(j)
    return (not is_text(j) or j <= i) and real_key(b, j)


@pytest.mark.parametrize(
    "build, rule",
    [(unimodal_mask, unimodal_rule), (bidirectional_mask, bidirectional_rule), (multimodal_causal_mask, multimodal_causal_rule)],
    ids=["unimodal", "bidirectional", "multimodal_causal"],
)
def test_mask_matches_its_definition_element_by_element(build, rule):
    mask = build(N_QUERY, TEXT_MASK)
    B, T = TEXT_MASK.shape
    L = N_QUERY + T
    assert mask.shape == (B, L, L)
    assert mask.dtype == torch.bool
    for b in range(B):
        for i in range(L):
            for j in range(L):
                assert bool(mask[b, i, j]) == rule(b, i, j), (build.__name__, b, i, j)


@pytest.mark.parametrize("build", [unimodal_mask, bidirectional_mask, multimodal_causal_mask])
def test_every_row_attends_to_something(build):
    # An all-False row gives NaN attention, which would reach the weights through backprop.
    mask = build(N_QUERY, TEXT_MASK)
    assert mask.any(dim=-1).all()


def test_masks_differ_where_the_objectives_differ():
    uni, bi, causal = (f(N_QUERY, TEXT_MASK) for f in (unimodal_mask, bidirectional_mask, multimodal_causal_mask))
    q, first_text, last_text = 0, N_QUERY, N_QUERY + TEXT_MASK.shape[1] - 1
    # A query reads the text only under ITM.
    assert not uni[0, q, first_text] and bi[0, q, first_text] and not causal[0, q, first_text]
    # The text reads the queries under ITM and ITG, not ITC.
    assert not uni[0, first_text, q] and bi[0, first_text, q] and causal[0, first_text, q]
    # Only ITG hides the future text.
    assert uni[0, first_text, last_text] and bi[0, first_text, last_text] and not causal[0, first_text, last_text]


def test_bool_and_integer_text_masks_give_the_same_result():
    for build in (unimodal_mask, bidirectional_mask, multimodal_causal_mask):
        assert torch.equal(build(N_QUERY, TEXT_MASK), build(N_QUERY, TEXT_MASK.bool()))


def test_text_mask_must_be_two_dimensional():
    with pytest.raises(ValueError, match=r"text_mask must be \(B, T\)"):
        unimodal_mask(N_QUERY, TEXT_MASK[0])

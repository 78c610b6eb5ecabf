"""`match: {bucket: shop}` selects the objects stored through the S3 API in bucket shop."""

from __future__ import annotations

import pytest

from cim_place.policies.codec import policy_to_dict
from cim_place.policies.problems import PolicyValidationError
from cim_place.policies.selectors import ObjectFacts, evaluate, match_policy
from cim_place.policies.validate import load_text

SET = load_text(
    """
- name: default
  replicas: 3
- name: shop
  priority: 10
  match: {bucket: [shop, shop-eu]}
  replicas: 2
""",
    "set.yaml",
).policy_set


def test_bucket_selector() -> None:
    in_shop = ObjectFacts(name="shop/img/a.png", metadata={"s3-bucket": "shop"})
    chosen, _ = match_policy(SET.policies, in_shop)
    assert chosen.name == "shop"
    other = ObjectFacts(name="shop/img/a.png")  # a name alone is not an S3 object of shop
    assert match_policy(SET.policies, other)[0].name == "default"
    shop = next(p for p in SET.policies if p.name == "shop")
    result = evaluate(shop, ObjectFacts(metadata={"s3-bucket": "blog"}))
    assert not result.matched and "'blog' is not one of [shop, shop-eu]" in result.reasons[0]
    assert policy_to_dict(shop)["match"] == {"bucket": ["shop", "shop-eu"]}


def test_bucket_selector_errors_are_reported() -> None:
    with pytest.raises(PolicyValidationError, match="bucket"):
        load_text("- name: p\n  replicas: 1\n  match: {bucket: 7}\n", "bad.yaml")

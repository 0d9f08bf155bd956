"""A degraded reservation has no lease: its id alone must say who may act on it."""

from __future__ import annotations

from quotas.degraded import degraded_id, degraded_id_belongs
from quotas.engine import Owner

SECRET = "pepper"


def test_a_degraded_id_belongs_to_its_tenant_only() -> None:
    rid = degraded_id(tenant_id=1, feature_id=7, nonce="abc123", secret=SECRET)
    assert degraded_id_belongs(rid, owner=Owner(tenant_id=1), secret=SECRET)
    assert not degraded_id_belongs(rid, owner=Owner(tenant_id=2), secret=SECRET)


def test_a_key_narrowed_to_other_features_may_not_act_on_it() -> None:
    rid = degraded_id(tenant_id=1, feature_id=7, nonce="abc123", secret=SECRET)
    assert degraded_id_belongs(rid, owner=Owner(tenant_id=1, feature_ids=(7,)), secret=SECRET)
    assert not degraded_id_belongs(rid, owner=Owner(tenant_id=1, feature_ids=(8,)), secret=SECRET)


def test_a_forged_or_altered_degraded_id_is_refused() -> None:
    rid = degraded_id(tenant_id=1, feature_id=7, nonce="abc123", secret=SECRET)
    other_feature = rid.replace("rsv_d_7-", "rsv_d_8-")
    altered = rid[:-1] + ("1" if rid[-1] == "0" else "0")
    for forged in ("rsv_d_0000", "rsv_d_7-abc", other_feature, altered):
        assert not degraded_id_belongs(forged, owner=Owner(tenant_id=1), secret=SECRET)

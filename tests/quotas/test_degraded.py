"""A degraded reservation has no lease: its id alone must say who may act on it, and what it
was for."""

from __future__ import annotations

from quotas.degraded import Subject, _signature, degraded_id, degraded_subject
from quotas.engine import Owner

SECRET = "pepper"
SUBJECT = Subject(feature_id=7, pool_id=3, model_id=12)


def test_a_degraded_id_belongs_to_its_tenant_only() -> None:
    rid = degraded_id(tenant_id=1, subject=SUBJECT, nonce="abc123", secret=SECRET)
    assert degraded_subject(rid, owner=Owner(tenant_id=1), secret=SECRET) == SUBJECT
    assert degraded_subject(rid, owner=Owner(tenant_id=2), secret=SECRET) is None


def test_a_key_narrowed_to_other_features_may_not_act_on_it() -> None:
    rid = degraded_id(tenant_id=1, subject=SUBJECT, nonce="abc123", secret=SECRET)
    assert degraded_subject(rid, owner=Owner(tenant_id=1, feature_ids=(7,)), secret=SECRET)
    assert degraded_subject(rid, owner=Owner(tenant_id=1, feature_ids=(8,)), secret=SECRET) is None


def test_a_forged_or_altered_degraded_id_is_refused() -> None:
    rid = degraded_id(tenant_id=1, subject=SUBJECT, nonce="abc123", secret=SECRET)
    assert rid.startswith("rsv_d_7.3.12-")
    other_feature = rid.replace("rsv_d_7.", "rsv_d_8.")
    other_pool = rid.replace(".3.", ".4.")
    other_model = rid.replace(".12-", ".13-")
    altered = rid[:-1] + ("1" if rid[-1] == "0" else "0")
    for forged in (
        "rsv_d_0000",
        "rsv_d_7-abc",
        "rsv_d_7.3-abc" + "0" * 16,
        other_feature,
        other_pool,
        other_model,
        altered,
    ):
        assert degraded_subject(forged, owner=Owner(tenant_id=1), secret=SECRET) is None, forged


def test_an_id_made_before_pool_and_model_were_carried_still_names_its_feature() -> None:
    # the earlier form: rsv_d_<feature>-<nonce><signature of tenant:feature:nonce>
    rid = f"rsv_d_7-abc123{_signature(1, '7', 'abc123', SECRET)}"
    assert degraded_subject(rid, owner=Owner(tenant_id=1), secret=SECRET) == Subject(7, None, None)
    assert degraded_subject(rid, owner=Owner(tenant_id=2), secret=SECRET) is None


def test_digits_that_are_not_ascii_are_refused_not_an_error() -> None:
    for forged in ("rsv_d_²-abc" + "0" * 16, "rsv_d_1.².3-abc" + "0" * 16):
        assert degraded_subject(forged, owner=Owner(tenant_id=1), secret=SECRET) is None
